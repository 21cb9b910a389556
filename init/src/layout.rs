//! The disk layout contract between the image builder, which writes it, and
//! the initramfs, which finds its partitions by GPT label at boot.

/// GPT partition labels. The initramfs looks partitions up by these names.
pub const ESP_LABEL: &str = "esp";
pub const ROOT_LABEL: &str = "slipway-root";
pub const VERITY_LABEL: &str = "slipway-root-verity";
pub const VAR_LABEL: &str = "slipway-var";

/// GPT partition type GUIDs (the Discoverable Partitions Specification's).
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
pub const ROOT_X86_64_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const ROOT_X86_64_VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
pub const VAR_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";

/// Name and uuid of the device-mapper device that carries the root.
pub const DM_ROOT_NAME: &str = "root";
pub const DM_ROOT_UUID: &str = "SLIPWAY-VERITY-root";

/// Where the initramfs keeps the writable upper layer of `/etc`.
pub const ETC_OVERLAY_DIR: &str = "/run/slipway/etc-overlay";

/// Kernel modules the initramfs loads, in the image's module directory.
pub const INITRD_MODULE_DIR: &str = "/lib/modules";
/// File in [`INITRD_MODULE_DIR`] listing module files in load order.
pub const INITRD_LOAD_ORDER: &str = "load-order";

/// A GUID's 16 bytes in the order GPT stores them (the first three fields
/// little-endian) from their textual order, or back: the swap is its own
/// inverse.
pub fn gpt_byte_order(b: [u8; 16]) -> [u8; 16] {
    [
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15],
    ]
}

/// A GUID's textual form (`c12a7328-f81f-11d2-ba4b-00a0c93ec93b`) from its
/// bytes in textual order.
pub fn guid_text(b: [u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
