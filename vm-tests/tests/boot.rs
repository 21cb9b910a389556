//! Boot tests of the built image under QEMU: a good image boots to
//! slipway-init with a verity, read-only root and powers off on the ACPI
//! power button; a tampered one is refused.

use anyhow::{ensure, Context, Result};
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;
use vm_tests::{Image, Vm, VmConfig};

/// TCG boots take 15–25 s to userspace here; leave ample room for a busy machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn image_boots_with_a_verity_read_only_root() -> Result<()> {
    let image = Image::locate()?;
    let mut vm = Vm::boot(&VmConfig::new("boot", image.qcow2(), "qcow2"))?;
    let line = vm.wait_for(
        &[
            "SLIPWAY-BOOT-CHECK",
            "SLIPWAY-INIT-FAILED",
            "refusing to boot",
        ],
        BOOT_DEADLINE,
    )?;
    let console = vm.console();
    ensure!(
        line.contains("SLIPWAY-BOOT-CHECK"),
        "boot did not pass its checks: {line}\n{}",
        vm.tail(40)
    );
    for check in [
        "root_verity=yes",
        "root_read_only=yes",
        "secrets_tmpfs=yes",
        "var_writable=yes",
    ] {
        ensure!(line.contains(check), "{check} missing from {line:?}");
    }
    ensure!(
        console.contains("slipway-initrd: verity root"),
        "the initramfs did not report the verity root"
    );
    ensure!(
        console.contains("first boot: /var populated"),
        "/var was not populated on first boot"
    );
    eprintln!(
        "booted to slipway-init in {:.1}s",
        vm.elapsed().as_secs_f64()
    );
    // This VM has no network: slipway-init goes on to read its stack
    // config from the metadata service, and says that it is waiting.
    let line = vm.wait_for(
        &["waiting for the instance metadata service", "SLIPWAY-INIT-"],
        BOOT_DEADLINE,
    )?;
    ensure!(
        line.contains("waiting for the instance metadata service"),
        "slipway-init did not go on to the metadata service: {line}\n{}",
        vm.tail(40)
    );
    // EC2 stops and terminates an instance with the ACPI power button: the
    // image shuts down cleanly on it (its units' stop actions run).
    let took = vm
        .power_down(Duration::from_secs(180))?
        .with_context(|| format!("no power-off on the ACPI power button\n{}", vm.tail(40)))?;
    eprintln!(
        "powered off {:.1}s after the power button",
        took.as_secs_f64()
    );
    Ok(())
}

#[test]
fn tampered_root_is_refused() -> Result<()> {
    let image = Image::locate()?;
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("tampered.raw");
    let status = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(image.raw())
        .arg(&copy)
        .status()
        .context("copying the disk")?;
    ensure!(status.success(), "cp failed");

    // Flip bytes in the EROFS superblock (1 KiB into the root partition).
    let (offset, _) = image.partition("slipway-root")?;
    let mut f = OpenOptions::new().read(true).write(true).open(&copy)?;
    let at = offset + 1024 + 8;
    let mut buf = [0u8; 16];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut buf)?;
    for b in &mut buf {
        *b ^= 0xff;
    }
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&buf)?;
    drop(f);

    let mut cfg = VmConfig::new("tampered", copy.clone(), "raw");
    cfg.snapshot = true;
    let mut vm = Vm::boot(&cfg)?;
    vm.wait_for(&["refusing to boot", "SLIPWAY-BOOT-CHECK"], BOOT_DEADLINE)?;
    vm.wait_exit(BOOT_DEADLINE)?;
    let console = vm.console();
    ensure!(
        !console.contains("SLIPWAY-BOOT-CHECK"),
        "a tampered root booted\n{}",
        vm.tail(40)
    );
    ensure!(
        console.contains("refusing to boot"),
        "the initramfs did not refuse the root\n{}",
        vm.tail(40)
    );
    ensure!(
        console.contains("verity") && console.contains("is corrupted"),
        "no dm-verity corruption error on the console\n{}",
        vm.tail(40)
    );
    fs::remove_file(copy)?;
    Ok(())
}
