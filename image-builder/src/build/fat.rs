//! The EFI system partition's filesystem: FAT made in memory (no mkfs, no
//! mounting) holding the UKI as the removable-media boot path, with a fixed
//! volume ID and timestamps so it is reproducible.

use std::io::{Cursor, Write};

#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("the UKI is {uki} bytes, too large for a {esp} byte ESP; raise image.esp_size_mib")]
    TooLarge { uki: u64, esp: u64 },
    #[error("building the ESP: {0}")]
    Fat(#[from] std::io::Error),
}

/// A FAT image of `size` bytes with `uki` at `EFI/BOOT/BOOTX64.EFI`.
pub fn build(size: u64, volume_id: u32, uki: &[u8]) -> Result<Vec<u8>, FatError> {
    if uki.len() as u64 + (4 << 20) > size {
        return Err(FatError::TooLarge {
            uki: uki.len() as u64,
            esp: size,
        });
    }
    let too_large = || FatError::TooLarge {
        uki: uki.len() as u64,
        esp: size,
    };
    let mut disk = Cursor::new(vec![0u8; usize::try_from(size).map_err(|_| too_large())?]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_id(volume_id)
            .volume_label(*b"ESP        "),
    )?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new())?;
        let boot = fs.root_dir().create_dir("EFI")?.create_dir("BOOT")?;
        let mut f = boot.create_file("BOOTX64.EFI")?;
        f.truncate()?;
        f.write_all(uki)?;
        f.flush()?;
    }
    Ok(disk.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_uki_can_be_read_back_and_output_is_stable() {
        let uki = vec![0x5a; 100_000];
        let a = build(32 << 20, 0x1234, &uki).unwrap();
        assert_eq!(a, build(32 << 20, 0x1234, &uki).unwrap());
        let mut cur = Cursor::new(a);
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
        let mut back = Vec::new();
        fs.root_dir()
            .open_file("EFI/BOOT/BOOTX64.EFI")
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, uki);
    }

    #[test]
    fn an_oversized_uki_is_refused() {
        assert!(matches!(
            build(4 << 20, 1, &[0; 10]),
            Err(FatError::TooLarge { .. })
        ));
    }
}
