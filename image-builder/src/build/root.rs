//! The root stage: the rootfs with the overlay laid over a hard-linked copy
//! of it, packed as a read-only EROFS image, and the dm-verity hash tree
//! that protects it.

use super::overlay::{self, Overlay};
use super::pinned_tools::ToolsOutput;
use super::rootfs::{self, RootfsOutput};
use super::stage::{self, Made, Stage};
use super::BuildError;
use crate::fsio;
use crate::progress::{self, Progress};
use crate::tools;
use serde::{Deserialize, Serialize};
use slipway_init::verity;
use std::fs;
use std::io;
use std::path::Path;

/// The filesystem image and its hash tree in the stage's directory.
pub const IMAGE: &str = "root.erofs";
pub const HASH_TREE: &str = "root.verity";

/// How the root filesystem is compressed: zstd at level 9 in 256 KiB
/// clusters, every file's tail packed into one shared fragment. Measured
/// on this tree (1.07 GB of files, 571 MB of them the pre-pulled images'
/// layers; README, "What a build produces"): LZMA at level 3 in 64 KiB
/// clusters wrote 293 MiB, this 286 MiB; the fragments take 33 MiB off
/// zstd's 319. The guest kernel decompresses zstd with a seventh of the CPU
/// LZMA takes under TCG, and a master reads most of the root at its first
/// boot. Part of the stage's key: other options make another root.
pub const COMPRESSION: [&str; 3] = ["-zzstd,level=9", "-C262144", "-Efragments,ztailpacking"];

/// Every input of the root stage.
#[derive(Debug, Serialize)]
pub struct Root<'a> {
    pub rootfs: &'a Made<RootfsOutput>,
    pub overlay: &'a Overlay,
    /// The pinned mkfs.erofs that writes the image.
    pub tools: &'a Made<ToolsOutput>,
    /// `/usr/lib/slipway/release`: the image's name and version.
    pub release: &'a str,
    pub source_date_epoch: u64,
    /// mkfs.erofs's compression options ([`COMPRESSION`]).
    pub compression: &'a [&'a str],
    /// The EROFS filesystem's UUID, and the verity superblock's.
    pub uuid: String,
    /// The verity salt (hex).
    pub salt: String,
}

/// What the root stage learnt.
#[derive(Debug, Serialize, Deserialize)]
pub struct RootOutput {
    /// The verity root hash (hex): the kernel command line's `roothash=`.
    pub root_hash: String,
    /// The size of the tree's files before compression.
    pub tree_bytes: u64,
    pub image_bytes: u64,
    pub hash_tree_bytes: u64,
}

impl RootOutput {
    /// The verity data blocks: the image's whole 4 KiB blocks.
    pub fn data_blocks(&self) -> u64 {
        self.image_bytes / u64::from(verity::BLOCK_SIZE)
    }
}

impl Stage for Root<'_> {
    const NAME: &'static str = "root filesystem";
    const KIND: &'static str = "root";
    type Output = RootOutput;

    fn make(&self, dir: &Path, _: &Progress) -> Result<RootOutput, BuildError> {
        let tree = dir.join("tree");
        overlay::link_copy(&self.rootfs.file(rootfs::TREE), &tree)?;
        self.overlay.apply(&tree, self.release)?;
        overlay::static_nodes(&tree)?;
        overlay::mark_updated(&tree, self.source_date_epoch)?;
        rootfs::clamp_mtimes(&tree, self.source_date_epoch)?;
        let tree_bytes = stage::tree_bytes(&tree);

        let image = dir.join(IMAGE);
        let mut cmd = self.tools.command("usr/bin/mkfs.erofs")?;
        cmd.arg("--quiet")
            .args(self.compression)
            .arg(format!("-T{}", self.source_date_epoch))
            .arg(format!("-U{}", self.uuid))
            .arg("--exclude-regex=^boot/.+")
            .arg(&image)
            .arg(&tree);
        tools::run(&mut cmd)?;
        fs::remove_dir_all(&tree).map_err(fsio::at("removing", &tree))?;

        // EROFS images are block-aligned already; verity needs whole blocks.
        let len = stage::sized(&image)?;
        let image_bytes = len.next_multiple_of(u64::from(verity::BLOCK_SIZE));
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(fsio::at("opening", &image))?;
        f.set_len(image_bytes)
            .map_err(fsio::at("padding", &image))?;
        let salt = hex::decode(&self.salt).map_err(|e| BuildError::Inputs {
            stage: Self::NAME,
            message: format!("the verity salt: {e}"),
        })?;
        let uuid = super::gpt::Guid::parse(&self.uuid).ok_or_else(|| BuildError::Inputs {
            stage: Self::NAME,
            message: format!("{:?} is not a UUID", self.uuid),
        })?;
        let input = fs::File::open(&image).map_err(fsio::at("reading", &image))?;
        let hashed =
            verity::build(io::BufReader::new(input), &salt, uuid.bytes()).map_err(|source| {
                BuildError::Verity {
                    path: image.clone(),
                    source,
                }
            })?;
        let hash_path = dir.join(HASH_TREE);
        fs::write(&hash_path, &hashed.device).map_err(fsio::at("writing", &hash_path))?;
        Ok(RootOutput {
            root_hash: hex::encode(hashed.root_hash),
            tree_bytes,
            image_bytes,
            hash_tree_bytes: hashed.device.len() as u64,
        })
    }

    fn note(&self, output: &RootOutput) -> String {
        format!("{} EROFS", progress::bytes(output.image_bytes))
    }
}
