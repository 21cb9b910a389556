//! The ESP stage: the boot chain. An initramfs (`slipway-initrd` and the
//! kernel modules it loads), the Unified Kernel Image (systemd's EFI stub
//! with the kernel, initramfs, command line and os-release as PE sections),
//! and the FAT filesystem of the EFI system partition that holds it.

use super::overlay;
use super::rootfs::{self, RootfsOutput};
use super::stage::{Content, Made, Stage};
use super::{fat, uki, BuildError};
use crate::fsio;
use crate::progress::{self, Progress};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::Path;

/// The partition's image and the UKI on it, in the stage's directory.
pub const IMAGE: &str = "esp.img";
pub const UKI: &str = "uki.efi";
/// systemd's EFI stub, in the rootfs.
const STUB: &str = "usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// Every input of the ESP stage.
#[derive(Debug, Serialize)]
pub struct Esp<'a> {
    /// The kernel, its modules, the EFI stub and the packages' os-release.
    pub rootfs: &'a Made<RootfsOutput>,
    /// The initramfs's `/init`.
    pub initrd: &'a Content,
    /// Modules the initramfs loads (their dependencies come along).
    pub modules: &'a [String],
    /// The kernel command line, the root hash included.
    pub cmdline: String,
    /// The image's name and version, for the UKI's os-release.
    pub release: &'a str,
    pub size: u64,
    pub volume_id: u32,
    pub source_date_epoch: u64,
}

/// What the ESP stage made.
#[derive(Debug, Serialize, Deserialize)]
pub struct EspOutput {
    pub uki_bytes: u64,
}

impl Stage for Esp<'_> {
    const NAME: &'static str = "esp";
    const KIND: &'static str = "esp";
    type Output = EspOutput;

    fn make(&self, dir: &Path, _: &Progress) -> Result<EspOutput, BuildError> {
        let tree = self.rootfs.file(rootfs::TREE);
        let kernel_version = &self.rootfs.output.kernel;
        let initramfs = uki::initramfs(
            &tree,
            kernel_version,
            &self.initrd.read()?,
            self.modules,
            self.source_date_epoch,
        )?;
        let stub_path = tree.join(STUB);
        let stub = fs::read(&stub_path).map_err(fsio::at(
            "reading the EFI stub (is systemd-boot-efi in debian.packages?)",
            &stub_path,
        ))?;
        let kernel_path = tree.join("boot").join(format!("vmlinuz-{kernel_version}"));
        let kernel = fs::read(&kernel_path).map_err(fsio::at("reading", &kernel_path))?;
        let os_release_path = tree.join("usr/lib/os-release");
        let packages_os_release =
            fs::read_to_string(&os_release_path).map_err(fsio::at("reading", &os_release_path))?;
        let os_release = overlay::image_os_release(&packages_os_release, self.release);
        let image = uki::add_sections(
            &stub,
            &[
                (".osrel", os_release.as_bytes()),
                (".cmdline", self.cmdline.as_bytes()),
                (".uname", kernel_version.as_bytes()),
                (".initrd", &initramfs),
                (".linux", &kernel),
            ],
            &stub_path,
        )?;
        let uki_path = dir.join(UKI);
        fs::write(&uki_path, &image).map_err(fsio::at("writing", &uki_path))?;
        let esp = fat::build(self.size, self.volume_id, &image)?;
        let esp_path = dir.join(IMAGE);
        fs::write(&esp_path, esp).map_err(fsio::at("writing", &esp_path))?;
        Ok(EspOutput {
            uki_bytes: image.len() as u64,
        })
    }

    fn note(&self, output: &EspOutput) -> String {
        format!("UKI {}", progress::bytes(output.uki_bytes))
    }
}
