//! Boot tests of the built image under QEMU: a good image boots to
//! slipway-init with a verity, read-only root and powers off on the ACPI
//! power button; a tampered one is refused.

use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;
use vm_tests::{Image, Vm, VmConfig};

/// TCG boots take 15–25 s to userspace here; leave ample room for a busy machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

/// Units a boot of the image must not run besides those it masks: nothing
/// pulls in `network-online.target`, and the build's update stamps make
/// the rest's `ConditionNeedsUpdate=` false.
const NOT_AT_BOOT: &[&str] = &[
    "systemd-networkd-wait-online.service",
    "ldconfig.service",
    "systemd-journal-catalog-update.service",
    "systemd-hwdb-update.service",
];

/// The modules the image blacklists (`rootfs/usr/lib/modprobe.d`), read
/// from the workspace the image was built from.
fn blacklisted_modules() -> Result<Vec<String>> {
    let path = vm_tests::workspace_dir().join("rootfs/usr/lib/modprobe.d/slipway.conf");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("blacklist "))
        .map(|n| n.trim().to_owned())
        .collect();
    ensure!(
        !names.is_empty(),
        "no blacklisted modules in {}",
        path.display()
    );
    Ok(names)
}

/// The seconds after the kernel started of a `short-monotonic` journal
/// line (`[   29.363910] host unit[pid]: …`).
fn monotonic(line: &str) -> Option<f64> {
    let (stamp, _) = line.trim_start().strip_prefix('[')?.split_once(']')?;
    stamp.trim().parse().ok()
}

/// The units the image masks (links to /dev/null in the overlay's
/// `etc/systemd/system`), read from the workspace the image was built from.
fn masked_units() -> Result<Vec<String>> {
    let dir = vm_tests::workspace_dir().join("rootfs/etc/systemd/system");
    let mut masked = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if fs::read_link(entry.path()).is_ok_and(|t| t == std::path::Path::new("/dev/null")) {
            masked.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    ensure!(!masked.is_empty(), "no masked units in {}", dir.display());
    Ok(masked)
}

/// A unit that, once slipway-init has started, prints every loaded unit's
/// ordering and activation times (`SLIPWAY-TEST-UNIT` lines, from which
/// the test follows the critical chain: `systemd-analyze critical-chain`
/// refuses while a boot is unfinished, and slipway-init never finishes
/// here), systemd-analyze's blame (`SLIPWAY-TEST-BLAME`), what
/// systemd-sysusers would still create (`SLIPWAY-TEST-SYSUSERS`) and two
/// of the kernel's on-demand device nodes (`SLIPWAY-TEST-NODE`), and the
/// size of `/var`'s filesystem in MiB (`SLIPWAY-TEST-VAR-MIB`), networkd's
/// line for the moment it took the network interface over (`SLIPWAY-TEST-NET`,
/// waited for up to a minute) and the loaded modules (`SLIPWAY-TEST-MODULE`).
/// It sleeps first, so that its own processes do not slow the boot it
/// measures (`$$` is systemd's escape for the shell's `$`).
const BOOT_ANALYSIS: &str = "[Unit]\nDescription=boot analysis (test only)\n\n\
    [Service]\nType=oneshot\nStandardOutput=journal+console\n\
    ExecStart=/bin/sh -c 'sleep 20; \
    until [ \"$$(systemctl show -P ExecMainStartTimestampMonotonic slipway-init.service)\" -gt 0 ]; do sleep 2; done; \
    systemctl show -p Id -p After -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic \"*\" \
    | sed \"s/^/SLIPWAY-TEST-UNIT /\"; \
    systemd-analyze blame --no-pager | head -n 25 | sed \"s/^/SLIPWAY-TEST-BLAME /\"; \
    systemd-sysusers --dry-run 2>&1 | sed \"s/^/SLIPWAY-TEST-SYSUSERS /\"; \
    ls -l /dev/net/tun /dev/loop-control 2>&1 | sed \"s/^/SLIPWAY-TEST-NODE /\"; \
    df -B1M --output=size /var | tail -n 1 | sed \"s/^ */SLIPWAY-TEST-VAR-MIB /\"; \
    for i in $$(seq 30); do journalctl -b -u systemd-networkd --no-pager | grep -q \"Configuring with\" && break; sleep 2; done; \
    journalctl -b -o short-monotonic --no-pager -u systemd-networkd | grep -m1 \"Configuring with\" \
    | sed \"s/^/SLIPWAY-TEST-NET /\"; \
    cut -d\" \" -f1 /proc/modules | sed \"s/^/SLIPWAY-TEST-MODULE /\"; \
    echo SLIPWAY-TEST-ANALYSED'\n";

/// A unit's ordering and when it started and became active (µs after the
/// kernel started; 0 if never).
#[derive(Default)]
struct UnitTimes {
    after: Vec<String>,
    inactive_exit: u64,
    active_enter: u64,
}

/// The `SLIPWAY-TEST-UNIT` blocks of a console, by unit name.
fn unit_times(console: &str) -> HashMap<String, UnitTimes> {
    let mut units = HashMap::new();
    let mut current: Option<(String, UnitTimes)> = None;
    for line in console.lines() {
        let Some((_, field)) = line.split_once("SLIPWAY-TEST-UNIT ") else {
            continue;
        };
        let Some((key, value)) = field.trim_end().split_once('=') else {
            continue;
        };
        match key {
            "Id" => {
                if let Some((id, t)) = current.take() {
                    units.insert(id, t);
                }
                current = Some((value.to_owned(), UnitTimes::default()));
            }
            _ => {
                let Some((_, t)) = current.as_mut() else {
                    continue;
                };
                match key {
                    "After" => t.after = value.split_whitespace().map(str::to_owned).collect(),
                    "InactiveExitTimestampMonotonic" => {
                        t.inactive_exit = value.parse().unwrap_or(0)
                    }
                    "ActiveEnterTimestampMonotonic" => t.active_enter = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
    }
    if let Some((id, t)) = current {
        units.insert(id, t);
    }
    units
}

/// What `unit` waited for, as systemd-analyze's critical chain finds it:
/// of the units it is ordered after, the one that became active last
/// before it started, then what that one waited for, and so on.
fn critical_chain(units: &HashMap<String, UnitTimes>, unit: &str) -> Vec<String> {
    let mut chain = Vec::new();
    let mut name = unit.to_owned();
    let mut visited = std::collections::HashSet::new();
    while let Some(u) = units.get(&name).filter(|_| visited.insert(name.clone())) {
        let took = u.active_enter.saturating_sub(u.inactive_exit);
        chain.push(format!(
            "{name} @{:.1}s{}",
            u.inactive_exit as f64 / 1e6,
            if u.active_enter > 0 && took > 0 {
                format!(" +{:.1}s", took as f64 / 1e6)
            } else {
                String::new()
            }
        ));
        let next = u
            .after
            .iter()
            .filter_map(|d| units.get(d).map(|t| (d, t.active_enter)))
            .filter(|(_, at)| *at > 0 && *at <= u.inactive_exit)
            .max_by_key(|(_, at)| *at);
        match next {
            Some((d, _)) => name = d.clone(),
            None => break,
        }
    }
    chain
}

/// The serial of the disk the boot test plugs in while the VM runs.
const PLUGGED_SERIAL: &str = "slipwayhotplug";

/// A unit that waits for an NVMe controller with [`PLUGGED_SERIAL`] to
/// arrive and prints its name and its namespace's size in sectors
/// (`SLIPWAY-TEST-PLUGGED`).
const PLUGGED_CHECK: &str = "[Unit]\nDescription=hot-plug check (test only)\n\n\
    [Service]\nStandardOutput=journal+console\n\
    ExecStart=/bin/sh -c 'until f=$$(grep -l slipwayhotplug /sys/class/nvme/*/serial 2>/dev/null); do sleep 1; done; \
    c=$$(basename $$(dirname $$f)); \
    until [ -e /sys/class/nvme/$$c/$${c}n1/size ]; do sleep 1; done; \
    echo SLIPWAY-TEST-PLUGGED $$c $$(cat /sys/class/nvme/$$c/$${c}n1/size)'\n";

#[test]
fn image_boots_with_a_verity_read_only_root() -> Result<()> {
    let image = Image::locate()?;
    let mut cfg = VmConfig::new("boot", image.qcow2(), "qcow2")
        .with_test_unit("slipway-boot-analysis.service", BOOT_ANALYSIS)
        .with_test_unit("slipway-plugged-check.service", PLUGGED_CHECK);
    cfg.hotplug_ports = 1;
    let mut vm = Vm::boot(&cfg)?;
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
    // The kernel's security modules as the command line lists them:
    // AppArmor on, systemd's BPF program (no unit asks for it) not loaded.
    ensure!(
        console.contains("AppArmor: AppArmor initialized"),
        "AppArmor did not start"
    );
    ensure!(
        !console.contains("bpf-restrict-fs: LSM BPF program attached"),
        "systemd attached its BPF LSM program (is `bpf` back in the kernel's lsm=?)"
    );
    // The verdict goes through the kernel's log, so the console shows it
    // when it is made, not once journald has started and forwarded it.
    // (Another line's text may precede the stamp: the console interleaves
    // the kernel's lines with journald's.)
    let checked = line
        .split_once("slipway-init: SLIPWAY-BOOT-CHECK")
        .and_then(|(before, _)| before.rfind('[').map(|at| &before[at..]))
        .and_then(monotonic)
        .with_context(|| format!("the boot check did not reach the kernel's log: {line:?}"))?;
    let started = vm
        .seen("SLIPWAY-BOOT-CHECK")
        .context("the boot check's line has no time")?;
    let kernel = vm.seen("Linux version").unwrap_or_default();
    eprintln!(
        "slipway-init started {:.1}s after QEMU started ({:.1}s of firmware; its boot check {checked:.1}s after the kernel)",
        started.as_secs_f64(),
        kernel.as_secs_f64()
    );
    vm_tests::figures::record(&[
        ("boot: firmware, to the kernel", kernel),
        ("boot: slipway-init starts", started),
    ]);
    vm.wait_for(&["SLIPWAY-TEST-ANALYSED"], BOOT_DEADLINE)?;
    let console = vm.console();
    let units = unit_times(&console);
    ensure!(
        units
            .get("slipway-init.service")
            .is_some_and(|u| u.inactive_exit > 0),
        "the analysis did not list slipway-init.service as started ({} units listed)",
        units.len()
    );
    eprintln!("critical chain (s after the kernel started):");
    for link in critical_chain(&units, "slipway-init.service") {
        eprintln!("  {link}");
    }
    eprintln!("slowest units:");
    for line in console.lines() {
        if let Some((_, b)) = line.split_once("SLIPWAY-TEST-BLAME ") {
            eprintln!("  {}", b.trim());
        }
    }
    // Nothing on the way to slipway-init waits for the network to be
    // declared online (slipway-init polls the metadata service itself),
    // and nothing does at boot what the build has done.
    let masked = masked_units()?;
    for unit in NOT_AT_BOOT
        .iter()
        .copied()
        .chain(masked.iter().map(String::as_str))
    {
        let ran = units.get(unit).is_some_and(|u| u.inactive_exit > 0);
        ensure!(!ran, "{unit} ran at boot");
    }
    // The users and groups exist in the image (the packages' own
    // maintainer scripts made them), so a masked systemd-sysusers misses
    // nothing; and the device nodes kmod-static-nodes would have listed
    // are there, from the image's tmpfiles.d.
    let lines = |tag: &str| -> Vec<String> {
        console
            .lines()
            .filter_map(|l| l.split_once(tag).map(|(_, r)| r.trim().to_owned()))
            .collect()
    };
    let sysusers = lines("SLIPWAY-TEST-SYSUSERS ");
    ensure!(
        !sysusers.iter().any(|l| l.to_lowercase().contains("creat")),
        "systemd-sysusers would create users or groups at boot: {sysusers:?}"
    );
    let nodes = lines("SLIPWAY-TEST-NODE ");
    ensure!(
        nodes.len() == 2 && nodes.iter().all(|l| l.starts_with('c')),
        "the kernel's on-demand device nodes are missing: {nodes:?}"
    );
    // The network interface's driver comes with the initramfs, udev loads
    // no driver for what an instance never uses, and the interface keeps
    // the kernel's name: networkd takes it over as soon as udev has handled
    // its first event, not after a rename's event queued behind udev's
    // whole first pass.
    let net = lines("SLIPWAY-TEST-NET ");
    let (line, configured) = net
        .first()
        .and_then(|l| Some((l, monotonic(l)?)))
        .with_context(|| {
            format!(
                "networkd did not take the interface over within a minute\n{}",
                vm.tail(40)
            )
        })?;
    ensure!(
        line.contains(" eth0: "),
        "the interface was renamed (net.ifnames=0 keeps the kernel's name): {line}"
    );
    eprintln!("networkd took the network interface over {configured:.1}s after the kernel started");
    vm_tests::figures::record(&[(
        "boot: network interface configured (after the kernel)",
        Duration::from_secs_f64(configured),
    )]);
    let loaded = lines("SLIPWAY-TEST-MODULE ");
    ensure!(
        loaded.iter().any(|m| m == "virtio_net"),
        "the analysis listed no virtio_net among the loaded modules: {loaded:?}"
    );
    for module in blacklisted_modules()? {
        ensure!(
            !loaded.contains(&module),
            "{module} was loaded at boot though the image blacklists it"
        );
    }
    // The image's disk is only as large as its content; /var grew at
    // boot to the end of the volume the instance was given.
    let disk_mib = image.manifest["disk"]["size"].as_u64().unwrap_or(0) >> 20;
    let var_mib: u64 = lines("SLIPWAY-TEST-VAR-MIB ")
        .first()
        .and_then(|l| l.parse().ok())
        .context("the analysis printed no size for /var")?;
    let volume_mib = vm_tests::ROOT_VOLUME_GIB << 10;
    ensure!(
        var_mib + disk_mib >= volume_mib,
        "/var is {var_mib} MiB on a {volume_mib} MiB volume (the image's disk is {disk_mib} MiB): it did not grow\n{}",
        vm.tail(60)
    );
    for said in ["/var's partition extended", "/var grown from"] {
        let line = console
            .lines()
            .find(|l| l.contains(said))
            .with_context(|| format!("the initramfs did not say {said:?}"))?;
        eprintln!("{}", line.trim());
    }
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
    // A volume attached to the running instance arrives as a new NVMe
    // controller, which slipway-init's volume step waits for.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("plugged.raw");
    fs::File::create(&file)?.set_len(1 << 30)?;
    vm.plug_disk(&vm_tests::Disk {
        file,
        format: "raw",
        serial: PLUGGED_SERIAL.to_owned(),
    })?;
    let plugged_at = vm.elapsed();
    let line = vm.wait_for(&["SLIPWAY-TEST-PLUGGED"], BOOT_DEADLINE)?;
    let sectors: u64 = line
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no size in {line:?}"))?;
    ensure!(
        sectors == (1 << 30) / 512,
        "the plugged disk has {sectors} sectors, not 1 GiB's: {line}"
    );
    let seen = vm.seen("SLIPWAY-TEST-PLUGGED").unwrap_or_default();
    eprintln!(
        "a disk plugged in was seen by the guest {:.1}s later",
        seen.saturating_sub(plugged_at).as_secs_f64()
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
