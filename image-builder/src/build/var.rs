//! The var stage: an empty, small ext4 for `/var`. The initramfs fills it
//! from the image's `/var` on first boot and grows it to the end of the
//! instance's volume.

use super::stage::Stage;
use super::BuildError;
use crate::progress::Progress;
use crate::tools;
use serde::{Deserialize, Serialize};
use slipway_init::layout;
use std::path::Path;

/// The filesystem image in the stage's directory.
pub const IMAGE: &str = "var.ext4";
/// How far `/var`'s ext4 can grow online in 4 KiB blocks: 1 TiB, the
/// template's largest root volume.
const GROWS_TO_BLOCKS: u64 = (1 << 40) / 4096;

/// Every input of the var stage.
#[derive(Debug, Serialize)]
pub struct Var {
    pub size_mib: u64,
    /// The filesystem's UUID, also its directory hash seed.
    pub uuid: String,
    pub source_date_epoch: u64,
}

/// What the var stage made: an image of `bytes` bytes.
#[derive(Debug, Serialize, Deserialize)]
pub struct VarOutput {
    pub bytes: u64,
}

impl Stage for Var {
    const NAME: &'static str = "var filesystem";
    const KIND: &'static str = "var";
    type Output = VarOutput;

    fn make(&self, dir: &Path, _: &Progress) -> Result<VarOutput, BuildError> {
        let mut cmd = tools::command(tools::MKFS_EXT4)?;
        cmd.env("E2FSPROGS_FAKE_TIME", self.source_date_epoch.to_string())
            .arg("-q")
            .arg("-F")
            .arg("-L")
            .arg(layout::VAR_LABEL)
            .arg("-U")
            .arg(&self.uuid)
            // 4 KiB blocks whatever its size, and room in the group
            // descriptors to grow online to the largest root volume the
            // template allows.
            .args(["-b", "4096", "-T", "default"])
            .arg("-E")
            .arg(format!(
                "hash_seed={},lazy_itable_init=0,nodiscard,resize={GROWS_TO_BLOCKS}",
                self.uuid
            ))
            .arg(dir.join(IMAGE))
            .arg(format!("{}M", self.size_mib));
        tools::run(&mut cmd)?;
        Ok(VarOutput {
            bytes: self.size_mib << 20,
        })
    }

    fn note(&self, _: &VarOutput) -> String {
        format!("{} MiB ext4", self.size_mib)
    }
}
