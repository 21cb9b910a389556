//! A private network for a cluster of VMs: a network namespace the test
//! creates, holding a bridge with the VPC subnets' router addresses, one tap
//! per VM, a DHCP and DNS server (Debian's dnsmasq) that hands each VM the
//! private IP its EC2 instance has and answers for the names the test
//! gives it (see [`Names`]), and TCP forwarders across the namespace
//! border (the AWS endpoint into it, the API server and etcd out of it).
//!
//! Nothing in the namespace has a route anywhere else: a guest reaches the
//! bridge, the addresses the test put there, and the other guests.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The instance metadata service's address, as on EC2.
pub const IMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

const BRIDGE: &str = "br0";

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(prefix: &str) -> Result<Self> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        sweep(prefix);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]))
            .context("creating a network namespace (needs root and iproute2)")?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn file(&self) -> Result<File> {
        let path = Path::new("/run/netns").join(&self.name);
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }
}

/// Deletes namespaces `prefix-PID-N` whose process is gone (a run that was
/// killed before it could clean up).
fn sweep(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&format!("{prefix}-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Moves the calling thread into the namespace behind `fd`.
fn enter(fd: &File) -> Result<()> {
    // SAFETY: setns on a valid namespace fd only changes this thread's
    // network namespace; no memory is shared with the kernel.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where one side of a forwarder lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The test's own namespace (loopback).
    Host,
    /// Inside the private network.
    Lan,
}

/// Where a forwarder connects: asked at each connection, so a target that
/// moves (the master, from zone to zone) is followed; `None` refuses the
/// connection.
pub type Target = Arc<dyn Fn() -> Option<SocketAddr> + Send + Sync>;

/// A [`Target`] that never moves.
fn fixed(to: SocketAddr) -> Target {
    Arc::new(move || Some(to))
}

/// A TCP forwarder from a listener on one side of the namespace border to
/// an address on the other. Stops accepting when dropped.
#[derive(Debug)]
pub struct Forward {
    pub local: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Forward {
    fn start(
        host: File,
        lan: File,
        listen: (Side, SocketAddr),
        to: (Side, Target),
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let ns = |side| if side == Side::Host { &host } else { &lan };
        let listen_ns = ns(listen.0).try_clone()?;
        let connect_ns = ns(to.0).try_clone()?;
        std::thread::spawn(move || {
            // A socket belongs to the namespace it was created in: listen
            // from one, then move the thread so its connections use the other.
            let listener = enter(&listen_ns)
                .and_then(|()| TcpListener::bind(listen.1).map_err(Into::into))
                .and_then(|l| enter(&connect_ns).map(|()| l));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(l.local_addr().map_err(anyhow::Error::from));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Some(target) = (to.1)() else { continue };
                let Ok(upstream) =
                    TcpStream::connect_timeout(&target, std::time::Duration::from_secs(5))
                else {
                    continue;
                };
                pipe(client, upstream);
            }
        });
        let local = rx.recv().context("forwarder thread")??;
        Ok(Self { local, stop })
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    };
    copy(a, b2);
    copy(b, a2);
}

/// A VM's place on the network: its tap device and MAC address.
#[derive(Debug, Clone)]
pub struct Port {
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// Has the network's dnsmasq (process `server`, if it runs) read its hosts
/// files again, as it does on SIGHUP.
fn reload(server: Option<u32>) {
    if let Some(pid) = server {
        // SAFETY: signalling the network's own dnsmasq, our child process.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    }
}

/// The names the network's DNS server answers for (a hosts file that
/// dnsmasq reads again on SIGHUP). Cheap to clone and send to a thread.
#[derive(Debug, Clone)]
pub struct Names {
    file: PathBuf,
    server: Option<u32>,
}

impl Names {
    /// Answers each name with its address from now on, and no other name.
    pub fn set(&self, names: &std::collections::BTreeMap<String, Ipv4Addr>) -> Result<()> {
        let text: String = names
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect();
        let tmp = self.file.with_extension("new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.file)?;
        reload(self.server);
        Ok(())
    }
}

/// The private network: namespace, bridge, DHCP.
#[derive(Debug)]
pub struct Lan {
    pub ns: Netns,
    /// Router address per subnet (the first host, as in a VPC).
    pub routers: Vec<(Ipv4Addr, u8)>,
    dir: PathBuf,
    dhcp: Option<Child>,
    taps: AtomicUsize,
}

impl Lan {
    /// A bridge routing between `subnets` (network, prefix), with the
    /// metadata service's address and DHCP on it.
    pub fn create(subnets: &[(Ipv4Addr, u8)], dir: &Path) -> Result<Self> {
        let ns = Netns::create("slipway")?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        let mut routers = Vec::new();
        for &(net, prefix) in subnets {
            let router = Ipv4Addr::from(u32::from(net) + 1);
            ns.ip(&["addr", "add", &format!("{router}/{prefix}"), "dev", BRIDGE])?;
            routers.push((router, prefix));
        }
        ns.ip(&["addr", "add", &format!("{IMDS_ADDR}/32"), "dev", "lo"])?;
        // Routing between the subnets, as the VPC router does.
        run(ns
            .command("sysctl")
            .args(["-q", "-w", "net.ipv4.ip_forward=1"]))?;
        let mut lan = Self {
            ns,
            routers,
            dir: dir.to_owned(),
            dhcp: None,
            taps: AtomicUsize::new(0),
        };
        std::fs::write(lan.hosts_file(), "")?;
        std::fs::write(lan.names_file(), "")?;
        lan.start_dhcp()?;
        Ok(lan)
    }

    fn hosts_file(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }

    fn names_file(&self) -> PathBuf {
        self.dir.join("dns-names")
    }

    /// A handle that sets the names the network's DNS server answers for.
    pub fn names(&self) -> Names {
        Names {
            file: self.names_file(),
            server: self.dhcp.as_ref().map(Child::id),
        }
    }

    fn start_dhcp(&mut self) -> Result<()> {
        let mut cmd = self.ns.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--user=root",
            "--group=root",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
        ])
        .arg(format!("--interface={BRIDGE}"))
        .arg(format!(
            "--pid-file={}",
            self.dir.join("dnsmasq.pid").display()
        ))
        .arg(format!(
            "--dhcp-leasefile={}",
            self.dir.join("dhcp-leases").display()
        ))
        .arg(format!("--dhcp-hostsfile={}", self.hosts_file().display()))
        .arg(format!("--addn-hosts={}", self.names_file().display()))
        .arg(format!(
            "--log-facility={}",
            self.dir.join("dnsmasq.log").display()
        ));
        for &(router, prefix) in &self.routers {
            let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)));
            let net = Ipv4Addr::from(u32::from(router) - 1);
            cmd.arg(format!("--dhcp-range={net},static,{mask},12h"));
        }
        // The resolver is on the router too. Like a VPC's resolver with no
        // internet behind it, it knows only the private zone's names the
        // test gives it (see `Names`); they are answered with TTL 0, so
        // the guests never hold on to an old address.
        let child = crate::die_with_parent(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting dnsmasq (Debian package dnsmasq-base)")?;
        self.dhcp = Some(child);
        std::thread::sleep(std::time::Duration::from_millis(300));
        if let Some(Ok(Some(status))) = self.dhcp.as_mut().map(Child::try_wait) {
            let mut err = String::new();
            if let Some(mut e) = self.dhcp.as_mut().and_then(|c| c.stderr.take()) {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("dnsmasq exited at start ({status}): {err}");
        }
        Ok(())
    }

    /// A tap on the bridge whose guest gets `ip` by DHCP.
    pub fn port(&self, ip: Ipv4Addr) -> Result<Port> {
        let n = self.taps.fetch_add(1, Ordering::SeqCst);
        let tap = format!("tap{n}");
        let o = ip.octets();
        let mac = format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        self.ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.ns.ip(&["link", "set", &tap, "master", BRIDGE])?;
        self.ns.ip(&["link", "set", &tap, "up"])?;
        let mut hosts = std::fs::OpenOptions::new()
            .append(true)
            .open(self.hosts_file())?;
        writeln!(hosts, "{mac},{ip}")?;
        drop(hosts);
        reload(self.dhcp.as_ref().map(Child::id));
        Ok(Port { tap, mac, ip })
    }

    /// Forwards connections to `listen` inside the network to `to` on the
    /// test's side (the AWS endpoint, for instance).
    pub fn forward_in(&self, listen: SocketAddr, to: SocketAddr) -> Result<Forward> {
        Forward::start(
            File::open("/proc/thread-self/ns/net")?,
            self.ns.file()?,
            (Side::Lan, listen),
            (Side::Host, fixed(to)),
        )
    }

    /// Forwards a loopback port on the test's side to wherever `to` says at
    /// each connection, inside the network.
    pub fn forward_out(&self, to: Target) -> Result<Forward> {
        self.forward_out_at(SocketAddr::from(([127, 0, 0, 1], 0)), to)
    }

    /// Forwards `listen` on the test's side (a loopback address) to
    /// wherever `to` says at each connection, inside the network.
    pub fn forward_out_at(&self, listen: SocketAddr, to: Target) -> Result<Forward> {
        anyhow::ensure!(
            listen.ip().is_loopback(),
            "{listen} is not a loopback address: the test talks to nothing else"
        );
        Forward::start(
            File::open("/proc/thread-self/ns/net")?,
            self.ns.file()?,
            (Side::Host, listen),
            (Side::Lan, to),
        )
    }

    /// Binds a listener inside the network (the metadata service's).
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        let (tx, rx) = std::sync::mpsc::channel();
        let lan = self.ns.file()?;
        std::thread::spawn(move || {
            let _ = tx.send(enter(&lan).and_then(|()| TcpListener::bind(addr).map_err(Into::into)));
        });
        rx.recv().context("listener thread")?
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some(mut c) = self.dhcp.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
