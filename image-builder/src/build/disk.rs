//! The disk stage: the GPT disk in the build directory (ESP, verity-protected
//! root, its hash tree, `/var`), written front to back and hashed and mapped
//! on the way, then its qcow2 copy for local VMs. It is not cached: the build
//! directory's manifest is its cache.

use super::esp::{self, EspOutput};
use super::gpt::{self, Guid};
use super::root::{self, RootOutput};
use super::stage::{self, Made};
use super::var::{self, VarOutput};
use super::BuildError;
use crate::manifest::{FileDigest, PartitionInfo};
use crate::progress::{self, Outcome, Progress};
use crate::{cache, fsio, tools};
use slipway_init::layout;
use std::fs;
use std::path::Path;

pub const RAW: &str = "disk.raw";
pub const QCOW2: &str = "disk.qcow2";

/// Every input of the disk.
#[derive(Debug)]
pub struct Disk<'a> {
    pub esp: &'a Made<EspOutput>,
    pub esp_size: u64,
    pub root: &'a Made<RootOutput>,
    pub var: &'a Made<VarOutput>,
    /// A larger disk than its partitions need, in GiB.
    pub size_gib: Option<u64>,
    /// Seeds the disk's and the partitions' GUIDs (the image's name and
    /// version).
    pub identity: &'a str,
}

/// The disk as written.
#[derive(Debug)]
pub struct DiskOutput {
    pub raw: FileDigest,
    pub qcow2: FileDigest,
    pub guid: Guid,
    pub partitions: Vec<PartitionInfo>,
    pub data_blocks: Vec<u64>,
}

impl Disk<'_> {
    /// A GUID of this image's, for `what`.
    fn guid(&self, what: &str) -> Guid {
        Guid::derive(&format!("{}:{what}", self.identity))
    }

    /// Writes `disk.raw` and `disk.qcow2` into `out`.
    pub fn write(&self, out: &Path, progress: &Progress) -> Result<DiskOutput, BuildError> {
        fs::create_dir_all(out).map_err(fsio::at("creating", out))?;
        let raw_path = out.join(RAW);
        let qcow2_path = out.join(QCOW2);
        let (esp_image, root_image, hash_tree, var_image) = (
            self.esp.file(esp::IMAGE),
            self.root.file(root::IMAGE),
            self.root.file(root::HASH_TREE),
            self.var.file(var::IMAGE),
        );
        let contents = [
            (
                layout::ESP_LABEL,
                layout::ESP_TYPE,
                &esp_image,
                self.esp_size,
            ),
            (
                layout::ROOT_LABEL,
                layout::ROOT_X86_64_TYPE,
                &root_image,
                self.root.output.image_bytes,
            ),
            (
                layout::VERITY_LABEL,
                layout::ROOT_X86_64_VERITY_TYPE,
                &hash_tree,
                self.root.output.hash_tree_bytes,
            ),
            (
                layout::VAR_LABEL,
                layout::VAR_TYPE,
                &var_image,
                self.var.output.bytes,
            ),
        ];
        let type_guid = |s: &str| Guid::parse(s).unwrap_or(Guid::derive(s));
        let parts: Vec<gpt::Partition<'_>> = contents
            .iter()
            .map(|(label, ty, path, size)| gpt::Partition {
                label,
                type_guid: type_guid(ty),
                guid: self.guid(label),
                size: *size,
                content: Some(path.as_path()),
            })
            .collect();
        let disk_guid = self.guid("disk");
        // EBS volumes come in whole GiB; /var grows at boot to the volume's end.
        let gib = self
            .size_gib
            .unwrap_or_else(|| gpt::needed_bytes(&parts).div_ceil(1 << 30));
        let size = gib << 30;
        let written = progress.stage("disk", || {
            let written = gpt::write(&raw_path, disk_guid, &parts, size)?;
            let note = format!(
                "{gib} GiB, {} in data blocks, sha256 {}",
                progress::bytes(written.data_blocks.len() as u64 * crate::manifest::DATA_BLOCK),
                &written.sha256[..16]
            );
            Ok::<_, BuildError>((written, Outcome::built(note)))
        })?;
        let qcow2 = progress.stage("qcow2", || {
            let _ = fs::remove_file(&qcow2_path);
            let mut cmd = tools::command(tools::QEMU_IMG)?;
            cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw_path)
                .arg(&qcow2_path);
            tools::run(&mut cmd)?;
            let digest = FileDigest {
                file: QCOW2.into(),
                size: stage::sized(&qcow2_path)?,
                sha256: cache::sha256_file(&qcow2_path)
                    .map_err(fsio::at("hashing", &qcow2_path))?,
            };
            let note = progress::bytes(digest.size);
            Ok::<_, BuildError>((digest, Outcome::built(note)))
        })?;
        let partitions = written
            .placed
            .iter()
            .zip(&contents)
            .zip(written.partition_sha256)
            .map(
                |((p, (label, ty, _, content_size)), sha256)| PartitionInfo {
                    label: (*label).to_owned(),
                    type_guid: (*ty).to_owned(),
                    guid: self.guid(label).to_string(),
                    offset: p.offset(),
                    size: p.size(),
                    content_size: *content_size,
                    sha256,
                },
            )
            .collect();
        Ok(DiskOutput {
            raw: FileDigest {
                file: RAW.into(),
                size,
                sha256: written.sha256,
            },
            qcow2,
            guid: disk_guid,
            partitions,
            data_blocks: written.data_blocks,
        })
    }
}
