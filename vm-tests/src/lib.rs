//! The QEMU harness for Slipway's boot tests: q35 + OVMF with a per-VM copy
//! of the variables store, the image on NVMe, the serial console captured to
//! a file and matched for markers, hard deadlines, and a VM that is always
//! killed when its handle drops, also when a test fails.
//!
//! TCG by default (these machines have no usable KVM); `SLIPWAY_VM_ACCEL=kvm`
//! opts in to KVM. A guest gets a network card on QEMU's user-mode network
//! with `restrict=on` (DHCP answers, nothing leaves) unless the test puts it
//! on a private network of its own ([`net::Lan`]).

pub mod cluster;
pub mod faults;
pub mod figures;
pub mod iam;
pub mod images;
pub mod imds;
pub mod moto;
pub mod net;
pub mod policy;
pub mod push;
pub mod registry;
pub mod releases;
pub mod server;

use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cache `just` fills (`SLIPWAY_CACHE_DIR`, else `~/.cache/slipway`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SLIPWAY_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/slipway")))
        .unwrap_or_default()
}

/// The workspace this crate sits in. Read at run time first (cargo sets
/// `CARGO_MANIFEST_DIR` for the tests and binaries it runs), because a
/// target directory shared by several clones keeps the library compiled
/// for whichever clone built it first.
pub fn workspace_dir() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    crate_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(crate_dir)
}

/// Where the consoles of stopped VMs are kept: `vm-logs` in cargo's
/// target dir, which outlives the checkout when it is set outside it (the
/// justfile keeps it in the cache), so a CI run's consoles can be read
/// after its clone is gone; `target/vm-logs` in the workspace otherwise.
pub fn vm_logs_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"))
        .join("vm-logs")
}

/// How long a kept console stays: long enough to read a CI run's after
/// it, short enough that the directory does not grow run after run.
const KEEP_LOGS_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// Removes the files in `dir` last written more than `age` ago.
fn prune_logs(dir: &Path, age: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|e| e > age);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A program `just fixtures` built from source (kubectl, etcdctl, …).
pub fn fixtures_bin(name: &str) -> PathBuf {
    cache_dir().join("fixtures/out/bin").join(name)
}

/// Where OVMF's code and variable templates live (Debian's `ovmf` package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The built image a test boots: `out/` of the workspace unless
/// `SLIPWAY_IMAGE_DIR` says otherwise.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
}

impl Image {
    pub fn locate() -> Result<Self> {
        Self::from_env("SLIPWAY_IMAGE_DIR", "out", "just build")
    }

    /// The next release the cluster test updates a cluster to: `out-next/`
    /// of the workspace unless `SLIPWAY_NEXT_IMAGE_DIR` says otherwise.
    pub fn locate_next() -> Result<Self> {
        Self::from_env("SLIPWAY_NEXT_IMAGE_DIR", "out-next", "just build-next")
    }

    fn from_env(variable: &str, default: &str, recipe: &str) -> Result<Self> {
        let dir = std::env::var_os(variable)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_dir().join(default));
        Self::at(dir.clone()).with_context(|| format!("run `{recipe}` first, or set {variable}"))
    }

    /// The image built in `dir`.
    pub fn at(dir: PathBuf) -> Result<Self> {
        let manifest_path = dir.join("build-manifest.json");
        let text = fs::read_to_string(&manifest_path)
            .with_context(|| format!("no image at {}", manifest_path.display()))?;
        let manifest = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", manifest_path.display()))?;
        Ok(Self { dir, manifest })
    }

    pub fn qcow2(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    pub fn raw(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }

    /// (offset, size) of the partition labelled `label`.
    pub fn partition(&self, label: &str) -> Result<(u64, u64)> {
        let parts = self.manifest["partitions"]
            .as_array()
            .context("manifest has no partitions")?;
        let p = parts
            .iter()
            .find(|p| p["label"] == label)
            .with_context(|| format!("manifest has no partition {label}"))?;
        Ok((
            p["offset"].as_u64().context("partition offset")?,
            p["size"].as_u64().context("partition size")?,
        ))
    }
}

/// The root volume's size the template asks for by default (its
/// `RootVolumeSize`), in GiB.
pub const ROOT_VOLUME_GIB: u64 = 8;

/// Makes `volume`, a copy-on-write qcow2 of `gib` GiB over `image` (a
/// disk in `format`): a fresh root volume from an AMI's snapshot.
pub fn create_volume(image: &Path, format: &str, volume: &Path, gib: u64) -> Result<()> {
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(image)
        .arg(volume)
        .arg(format!("{gib}G"))
        .status()
        .context("running qemu-img (Debian package qemu-utils)")?;
    ensure!(status.success(), "qemu-img create {}", volume.display());
    Ok(())
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub disk: PathBuf,
    pub disk_format: &'static str,
    /// Discard writes to the disk (the image stays pristine).
    pub snapshot: bool,
    /// With `snapshot`, the VM's disk is a throwaway volume of this many
    /// GiB over `disk`, as EC2 makes a root volume larger than its
    /// snapshot (`/var` grows into the rest).
    pub root_volume_gib: Option<u64>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// systemd credentials passed in through SMBIOS (type 11 OEM strings):
    /// `systemd.extra-unit.<name>` adds a unit for the test without touching
    /// the image, `systemd.unit-dropin.<unit>` a drop-in.
    pub credentials: Vec<(String, Vec<u8>)>,
    pub nic: Nic,
    /// A root shell on a virtio console behind this unix socket (a test-only
    /// unit passed as a credential), for a person debugging a run.
    pub shell_socket: Option<PathBuf>,
    /// More NVMe disks (an EBS volume: serial = volume ID without the hyphen).
    pub disks: Vec<Disk>,
    /// Empty PCIe root ports, each of which takes one disk attached while
    /// the VM runs ([`Vm::plug_disk`]: an EBS volume attached to a running
    /// instance, which Nitro presents as a hot-plugged NVMe controller).
    pub hotplug_ports: u8,
}

/// The VM's network card.
#[derive(Debug, Clone)]
pub enum Nic {
    /// QEMU's user-mode network, isolated: DHCP and nothing else.
    Isolated,
    /// A tap on a test network, QEMU started inside its namespace.
    Tap { netns: String, port: net::Port },
}

/// An extra NVMe disk.
#[derive(Debug, Clone)]
pub struct Disk {
    pub file: PathBuf,
    pub format: &'static str,
    pub serial: String,
}

impl VmConfig {
    pub fn new(name: &str, disk: PathBuf, disk_format: &'static str) -> Self {
        Self {
            name: name.to_owned(),
            disk,
            disk_format,
            snapshot: true,
            root_volume_gib: Some(ROOT_VOLUME_GIB),
            memory_mib: 1024,
            cpus: 1,
            credentials: Vec::new(),
            nic: Nic::Isolated,
            shell_socket: None,
            disks: Vec::new(),
            hotplug_ports: 0,
        }
    }

    /// Adds a root shell on `/dev/hvc0` (systemd's getty there, logged in
    /// as root by a test-only drop-in), reachable on the host through
    /// `socket` (`socat - UNIX-CONNECT:SOCKET`).
    pub fn with_shell(mut self, socket: PathBuf) -> Self {
        self.shell_socket = Some(socket);
        self.credentials.push((
            "systemd.unit-dropin.serial-getty@hvc0.service".to_owned(),
            b"[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 - $TERM\n"
                .to_vec(),
        ));
        self
    }

    /// Adds a unit that runs in the guest (and is started by multi-user.target).
    pub fn with_test_unit(mut self, name: &str, unit: &str) -> Self {
        self.credentials.push((
            format!("systemd.extra-unit.{name}"),
            unit.as_bytes().to_vec(),
        ));
        // One drop-in for the target (a credential's name is unique), which
        // wants every test unit.
        const TARGET: &str = "systemd.unit-dropin.multi-user.target";
        match self.credentials.iter_mut().find(|(k, _)| k == TARGET) {
            Some((_, text)) => text.extend_from_slice(format!("Wants={name}\n").as_bytes()),
            None => self.credentials.push((
                TARGET.to_owned(),
                format!("[Unit]\nWants={name}\n").into_bytes(),
            )),
        }
        self
    }
}

/// A free loopback port for a server this process starts as a child, and
/// no other caller in this process gets the same one. Taken from below the
/// kernel's ephemeral range, one after another: a port from `bind(0)`,
/// released for the child to take, could go to a second server starting
/// at the same time (whose failed bind then leaves its test talking to the
/// first's) or to an outgoing connection before the child binds it.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes started at once begin at different places in the span.
    let offset = std::process::id() % 600 * 20;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (offset + n) % SPAN)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// Makes a child the kernel kills when the thread that started it exits,
/// so a test that is itself killed leaves no VM or service behind.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The last `n` lines of `text`.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A running VM. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    /// QEMU; behind a lock so a shared handle can ask whether it exited.
    child: std::sync::Mutex<Child>,
    serial: PathBuf,
    /// What QEMU itself printed (its errors), kept beside the console.
    qemu_log: PathBuf,
    workdir: tempfile::TempDir,
    started: Instant,
    /// Every console line with when it first appeared (a watcher thread).
    timeline: std::sync::Arc<std::sync::Mutex<Vec<(Duration, String)>>>,
    watching: std::sync::Arc<std::sync::atomic::AtomicBool>,
    monitor: Monitor,
}

/// A handle on a VM's QEMU monitor (QMP) that other threads may hold:
/// commands, and disks plugged in while the VM runs.
#[derive(Debug, Clone)]
pub struct Monitor {
    name: String,
    socket: PathBuf,
    hotplug_ports: u8,
    /// The serials of the disks plugged in, in port order.
    plugged: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The QEMU id prefix of the empty root ports disks are plugged into.
const HOTPLUG_PORT: &str = "hotplug";

/// Follows the console file, stamping each line with when it appeared.
fn watch_console(
    serial: PathBuf,
    started: Instant,
    timeline: std::sync::Arc<std::sync::Mutex<Vec<(Duration, String)>>>,
    watching: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    std::thread::spawn(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut seen = 0u64;
        let mut partial = String::new();
        let mut bytes = Vec::new();
        while watching.load(std::sync::atomic::Ordering::SeqCst) {
            // Only what was added since the last look: a busy member's
            // console grows to megabytes, read five times a second.
            bytes.clear();
            let read = fs::File::open(&serial).and_then(|mut f| {
                f.seek(SeekFrom::Start(seen))?;
                f.read_to_end(&mut bytes)
            });
            if let Ok(n) = read {
                if n > 0 {
                    partial.push_str(&String::from_utf8_lossy(&bytes));
                    seen += n as u64;
                    let now = started.elapsed();
                    while let Some(end) = partial.find('\n') {
                        let line: String = partial.drain(..=end).collect();
                        if let Ok(mut t) = timeline.lock() {
                            t.push((now, line.trim().to_owned()));
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

fn accel() -> String {
    match std::env::var("SLIPWAY_VM_ACCEL").as_deref() {
        Ok("kvm") => "kvm".to_owned(),
        _ => "tcg,thread=multi".to_owned(),
    }
}

impl Vm {
    pub fn boot(cfg: &VmConfig) -> Result<Self> {
        for f in [OVMF_CODE, OVMF_VARS] {
            if !Path::new(f).exists() {
                bail!("{f} is missing: install the Debian package `ovmf`");
            }
        }
        let workdir = tempfile::Builder::new()
            .prefix(&format!("slipway-vm-{}-", cfg.name))
            .tempdir()?;
        let vars = workdir.path().join("OVMF_VARS.fd");
        fs::copy(OVMF_VARS, &vars).context("copying the OVMF variables store")?;
        let serial = workdir.path().join("serial.log");
        // A throwaway volume already keeps the disk pristine: QEMU's own
        // snapshot layer would be a second one.
        let (disk, disk_format, snapshot) = match cfg.root_volume_gib {
            Some(gib) if cfg.snapshot => {
                let volume = workdir.path().join("root.qcow2");
                create_volume(&cfg.disk, cfg.disk_format, &volume, gib)?;
                (volume, "qcow2", "")
            }
            _ if cfg.snapshot => (cfg.disk.clone(), cfg.disk_format, ",snapshot=on"),
            _ => (cfg.disk.clone(), cfg.disk_format, ""),
        };
        let mut cmd = match &cfg.nic {
            Nic::Isolated => Command::new("qemu-system-x86_64"),
            Nic::Tap { netns, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, "qemu-system-x86_64"]);
                c
            }
        };
        cmd.args(["-machine", "q35", "-accel", &accel()])
            .args([
                "-m",
                &cfg.memory_mib.to_string(),
                "-smp",
                &cfg.cpus.to_string(),
            ])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=root,format={disk_format}{snapshot}",
                disk.display(),
            ))
            .args(["-device", "nvme,serial=slipwayroot,drive=root"]);
        for (i, d) in cfg.disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=disk{i},format={}",
                    d.file.display(),
                    d.format
                ))
                .arg("-device")
                .arg(format!("nvme,serial={},drive=disk{i}", d.serial));
        }
        for port in 0..cfg.hotplug_ports {
            cmd.arg("-device").arg(format!(
                "pcie-root-port,id={HOTPLUG_PORT}{port},chassis={},slot={}",
                port + 1,
                port + 1
            ));
        }
        // The monitor, for an ACPI power-down as EC2 gives a terminating
        // instance, and for disks plugged in while the VM runs.
        let qmp_socket = workdir.path().join("qmp.sock");
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()));
        if let Some(socket) = &cfg.shell_socket {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=shell,path={},server=on,wait=off",
                    socket.display()
                ))
                .args([
                    "-device",
                    "virtio-serial-pci",
                    "-device",
                    "virtconsole,chardev=shell",
                ]);
        }
        // The NIC without its option ROM: an instance boots from its disk,
        // never from the network, and the firmware would start iPXE first.
        match &cfg.nic {
            Nic::Isolated => cmd
                .args(["-netdev", "user,id=net0,restrict=on"])
                .args(["-device", "virtio-net-pci,netdev=net0,romfile="]),
            Nic::Tap { port, .. } => cmd
                .arg("-netdev")
                .arg(format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    port.tap
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=net0,mac={},romfile=",
                    port.mac
                )),
        };
        for (name, value) in &cfg.credentials {
            cmd.arg("-smbios").arg(format!(
                "type=11,value=io.systemd.credential.binary:{name}={}",
                base64(value)
            ));
        }
        // QEMU's own messages go to a file: a pipe nobody reads would
        // stop QEMU, guest and all, once it filled.
        let qemu_log = workdir.path().join("qemu.log");
        let stderr = fs::File::create(&qemu_log).context("creating QEMU's log")?;
        cmd.arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = die_with_parent(&mut cmd)
            .spawn()
            .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
        let started = Instant::now();
        let timeline = std::sync::Arc::default();
        let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        watch_console(
            serial.clone(),
            started,
            std::sync::Arc::clone(&timeline),
            std::sync::Arc::clone(&watching),
        );
        Ok(Self {
            name: cfg.name.clone(),
            child: std::sync::Mutex::new(child),
            serial,
            qemu_log,
            workdir,
            started,
            timeline,
            watching,
            monitor: Monitor {
                name: cfg.name.clone(),
                socket: qmp_socket,
                hotplug_ports: cfg.hotplug_ports,
                plugged: std::sync::Arc::default(),
            },
        })
    }

    /// A handle on the VM's monitor, for another thread.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// See [`Monitor::plug_disk`].
    pub fn plug_disk(&self, disk: &Disk) -> Result<()> {
        self.monitor.plug_disk(disk)
    }

    /// Runs one QEMU monitor command and returns its answer (the JSON line
    /// holding `"return"`).
    pub fn qmp(&self, command: &str) -> Result<String> {
        self.monitor.qmp_with(command, &serde_json::Value::Null)
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether QEMU has exited (the guest powered off, or QEMU died).
    pub fn exited(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(child.try_wait(), Ok(Some(_)))
    }

    /// How long the console has printed nothing (since QEMU started, if
    /// it never has).
    pub fn silent_for(&self) -> Duration {
        let last = self
            .timeline
            .lock()
            .ok()
            .and_then(|t| t.last().map(|(at, _)| *at))
            .unwrap_or_default();
        self.started.elapsed().saturating_sub(last)
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the console shows one of `markers` and returns the line
    /// it is on. Fails at the deadline or when QEMU exits first.
    pub fn wait_for(&mut self, markers: &[&str], deadline: Duration) -> Result<String> {
        loop {
            let console = self.console();
            for line in console.lines() {
                if markers.iter().any(|m| line.contains(m)) {
                    return Ok(line.trim().to_owned());
                }
            }
            if self.exited() {
                bail!(
                    "{} powered off before printing any of {markers:?}\n{}",
                    self.name,
                    self.tail(40)
                );
            }
            if self.started.elapsed() > deadline {
                bail!(
                    "{} printed none of {markers:?} within {deadline:?}\n{}",
                    self.name,
                    self.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for QEMU to exit (the guest powered off) within `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Result<()> {
        while !self.exited() {
            if self.started.elapsed() > deadline {
                bail!(
                    "{} still running after {deadline:?}\n{}",
                    self.name,
                    self.tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    /// Presses the power button (ACPI, as EC2 does when it stops or
    /// terminates an instance) and waits up to `grace` for the guest to
    /// power off; QEMU is killed after that. Returns how long the guest
    /// took, or `None` when it had to be killed.
    pub fn power_down(&mut self, grace: Duration) -> Result<Option<Duration>> {
        let asked = Instant::now();
        self.qmp("system_powerdown")?;
        while !self.exited() {
            if asked.elapsed() > grace {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(Some(asked.elapsed()))
    }

    /// How long since QEMU started: the clock [`Vm::seen`] reads.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The longest stretch without a new console line from `since` (on
    /// the [`Vm::uptime`] clock) until now, its end included.
    pub fn longest_silence_since(&self, since: Duration) -> Duration {
        let Ok(timeline) = self.timeline.lock() else {
            return Duration::ZERO;
        };
        let mut last = since;
        let mut longest = Duration::ZERO;
        for (at, _) in timeline.iter().filter(|(at, _)| *at >= since) {
            longest = longest.max(at.saturating_sub(last));
            last = *at;
        }
        longest.max(self.started.elapsed().saturating_sub(last))
    }

    /// The last `n` console lines, for failure messages, and whatever
    /// QEMU itself printed.
    pub fn tail(&self, n: usize) -> String {
        let mut tail = format!(
            "--- last console lines of {} ---\n{}",
            self.name,
            last_lines(&self.console(), n)
        );
        let qemu = fs::read_to_string(&self.qemu_log).unwrap_or_default();
        if !qemu.trim().is_empty() {
            tail.push_str(&format!(
                "\n--- QEMU's messages for {} ---\n{}",
                self.name,
                last_lines(&qemu, 20)
            ));
        }
        tail
    }

    /// Keeps the console log (and QEMU's messages, if it printed any) in
    /// [`vm_logs_dir`] for a person to read.
    pub fn keep_log(&self) -> Option<PathBuf> {
        let dir = vm_logs_dir();
        fs::create_dir_all(&dir).ok()?;
        prune_logs(&dir, KEEP_LOGS_FOR);
        let dest = dir.join(format!("{}.log", self.name));
        fs::copy(&self.serial, &dest).ok()?;
        if fs::metadata(&self.qemu_log).is_ok_and(|m| m.len() > 0) {
            let _ = fs::copy(&self.qemu_log, dir.join(format!("{}.qemu.log", self.name)));
        }
        Some(dest)
    }

    /// When (after QEMU started) a console line containing `marker` first
    /// appeared, to within the watcher's 200 ms. A line already in the
    /// console (`wait_for` reads the file itself) is given the watcher's
    /// next round to be stamped.
    pub fn seen(&self, marker: &str) -> Option<Duration> {
        let stamped = || {
            let t = self.timeline.lock().ok()?;
            t.iter().find(|(_, l)| l.contains(marker)).map(|(d, _)| *d)
        };
        if let Some(t) = stamped() {
            return Some(t);
        }
        if !self.console().contains(marker) {
            return None;
        }
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(t) = stamped() {
                return Some(t);
            }
        }
        None
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }
}

impl Monitor {
    /// Attaches `disk` to the running VM as a new NVMe controller on the
    /// next free hot-plug port, as EBS attaches a volume to a running
    /// instance; the guest's kernel sees it arrive (PCIe native hot-plug).
    /// Plugging a serial already plugged does nothing.
    pub fn plug_disk(&self, disk: &Disk) -> Result<()> {
        let mut plugged = self
            .plugged
            .lock()
            .map_err(|_| anyhow::anyhow!("a thread plugging a disk panicked"))?;
        if plugged.contains(&disk.serial) {
            return Ok(());
        }
        let port = u8::try_from(plugged.len())?;
        ensure!(
            port < self.hotplug_ports,
            "{}: no free hot-plug port for {} ({} configured, all taken)",
            self.name,
            disk.serial,
            self.hotplug_ports
        );
        let node = format!("plugged{port}");
        self.qmp_with(
            "blockdev-add",
            &serde_json::json!({
                "driver": disk.format,
                "node-name": node,
                "file": {"driver": "file", "filename": disk.file},
            }),
        )?;
        self.qmp_with(
            "device_add",
            &serde_json::json!({
                "driver": "nvme",
                "id": format!("{node}-nvme"),
                "bus": format!("{HOTPLUG_PORT}{port}"),
                "serial": disk.serial,
                "drive": node,
            }),
        )?;
        plugged.push(disk.serial.clone());
        Ok(())
    }

    /// Runs one QEMU monitor command with `arguments` (none when null) and
    /// returns its answer (the JSON line holding `"return"`).
    pub fn qmp_with(&self, command: &str, arguments: &serde_json::Value) -> Result<String> {
        use std::io::{BufRead, Write};
        let socket = &self.socket;
        let mut qmp = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("{}: connecting to {}", self.name, socket.display()))?;
        qmp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut lines = std::io::BufReader::new(qmp.try_clone()?).lines();
        // The greeting, then one answer per command (events may come between).
        lines.next().context("QMP said nothing")??;
        let mut answer = String::new();
        let mut request = serde_json::json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments.clone();
        }
        for (command, request) in [
            (
                "qmp_capabilities",
                serde_json::json!({"execute": "qmp_capabilities"}),
            ),
            (command, request),
        ] {
            writeln!(qmp, "{request}")?;
            answer = loop {
                let line = lines.next().context("QMP closed")??;
                ensure!(!line.contains("\"error\""), "QMP {command}: {line}");
                if line.contains("\"return\"") {
                    break line;
                }
            };
        }
        Ok(answer)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.watching
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.keep_log();
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_unit_is_wanted_by_the_one_drop_in_for_the_target() {
        let cfg = VmConfig::new("t", PathBuf::from("/x"), "raw")
            .with_test_unit("a.service", "")
            .with_test_unit("b.service", "");
        let dropins: Vec<_> = cfg
            .credentials
            .iter()
            .filter(|(k, _)| k.starts_with("systemd.unit-dropin.multi-user.target"))
            .collect();
        assert_eq!(dropins.len(), 1);
        assert_eq!(
            String::from_utf8_lossy(&dropins[0].1),
            "[Unit]\nWants=a.service\nWants=b.service\n"
        );
    }

    #[test]
    fn the_test_volumes_are_as_large_as_the_templates_default() {
        let path = crate::workspace_dir().join("cfn/template.yaml");
        let text = fs::read_to_string(&path).unwrap();
        // The template's CloudFormation tags (!Ref, !Sub) are not YAML the
        // parser knows: only the parameters are read.
        let block: String = text
            .lines()
            .skip_while(|l| *l != "Parameters:")
            .enumerate()
            .take_while(|(i, l)| *i == 0 || l.is_empty() || l.starts_with([' ', '#']))
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let params: serde_yaml_ng::Value = serde_yaml_ng::from_str(&block).unwrap();
        assert_eq!(
            params["Parameters"]["RootVolumeSize"]["Default"].as_u64(),
            Some(ROOT_VOLUME_GIB)
        );
    }

    #[test]
    fn a_qemu_that_fails_to_start_is_seen_exited_with_its_own_words() {
        let missing = std::env::temp_dir().join("slipway-no-such-disk.qcow2");
        // QEMU itself is given the missing disk (no volume made over it).
        let mut cfg = VmConfig::new("no-disk", missing, "qcow2");
        cfg.root_volume_gib = None;
        let vm = Vm::boot(&cfg).unwrap();
        let started = Instant::now();
        while !vm.exited() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "QEMU still runs without its disk"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let tail = vm.tail(5);
        assert!(
            tail.contains("QEMU's messages") && tail.contains("slipway-no-such-disk"),
            "{tail}"
        );
    }

    #[test]
    fn a_running_guest_answers_on_its_monitor() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("blank.raw");
        fs::File::create(&disk)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        let vm = Vm::boot(&VmConfig::new("blank", disk, "raw")).unwrap();
        let mut status = Err(anyhow::anyhow!("not asked"));
        for _ in 0..50 {
            status = vm.qmp("query-status");
            if status.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = status.unwrap();
        assert!(status.contains("running"), "{status}");
        assert!(!vm.exited());
    }
}
