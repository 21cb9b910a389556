//! A whole Slipway cluster on this machine: the built image published to
//! moto, read back from its snapshot, the rendered template created as a
//! stack, and one QEMU VM per instance moto launched, on a private network
//! ([`crate::net::Lan`]) where 169.254.169.254 is the metadata emulator
//! playing that instance and the AWS endpoint is moto.
//!
//! What the test supplies beyond EC2 itself, and says so:
//! - every unit that calls AWS gets a test-only drop-in (a systemd
//!   credential, which EC2 cannot pass) setting `SLIPWAY_AWS_ENDPOINT` to
//!   moto, reached through the network's router: a release image takes no
//!   endpoint from its user data; the metadata service serves the launch
//!   template's user data as it is, and each instance a session of its own
//!   role;
//! - IAM is enforced once the stack exists ([`crate::iam`]): every member's
//!   call is checked against its role's policies as moto can check them
//!   (action names and S3 ARNs; conditions dropped and other resources
//!   widened to `*`, a stand-in), the test's own calls run as an
//!   administrator;
//! - the master's data volume is a disk file presented as NVMe with the
//!   volume ID as serial from the start when the cluster has one (EBS
//!   attaches it when asked; slipway-init still calls AttachVolume before
//!   it looks for the device); a volume attached while the master runs (a
//!   restore's) is plugged into its VM once EC2 says it is attached, on a
//!   PCIe hot-plug port, as EBS presents it ([`Attacher`]);
//! - instances are "launched" by booting a VM with a fresh root disk made
//!   from the snapshot, and "terminated" by killing it.

mod resolver;
mod rolling;

pub use rolling::{Retired, Rolled, RollingUpdate};

use crate::faults::{FaultProxy, Kind, Plan};
use crate::iam::Identity;
use crate::moto::Moto;
use crate::net::{Forward, Lan, Target, IMDS_ADDR};
use crate::{imds::Imds, Disk, Image, Nic, Vm, VmConfig};
use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use image_builder::publish::Release;
use resolver::Resolver;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";
/// The image's units that call AWS (each is told where the local AWS is).
const AWS_UNITS: [&str; 7] = [
    "slipway-init.service",
    "slipway-addons.service",
    "slipway-renew.service",
    "slipway-backup.service",
    "slipway-approver.service",
    "slipway-ready.service",
    "slipway-leave.service",
];
pub const STACK: &str = "slipway";
/// What a guest kernel prints as it dies.
const GUEST_PANIC: &str = "Kernel panic - not syncing";
/// How a failure that is the emulator's, not the product's, is reported
/// (`just cluster-test` runs the test once more on seeing it): a guest
/// kernel that died of an oops while patching its own code (an `int3`
/// trap, a double fault), seen now and then under multi-threaded TCG with
/// two vCPUs, or a guest that stopped printing anything at all.
pub const EMULATOR_FAULT: &str = "EMULATOR-FAULT";
/// How long a member's console may stay silent before the guest counts as
/// frozen: the status unit prints every two minutes, and a guest that has
/// frozen under emulation never prints again.
const GUEST_SILENCE: Duration = Duration::from_secs(8 * 60);
/// Port moto answers on inside the network (on the first subnet's router).
const AWS_PORT: u16 = 5000;
/// Seeds the fault proxy's choices, so a run's faults can be told apart.
const FAULT_SEED: u64 = 20;

/// A test-only unit (handed in as a credential, not in the image) that
/// prints the containers, the last words of exited API server and etcd
/// containers and kubelet's latest complaints to the console every two
/// minutes, so a failed run's kept console says where a member was. Its
/// crictl and journalctl cost a loaded master 4 to 9 s of CPU a run under
/// emulation, so the first run waits five minutes: the bring-up the
/// timings measure has the members' CPU to itself, and its own lines keep
/// the console from falling silent meanwhile.
const STATUS_UNIT: &str = "[Unit]\nDescription=cluster test status (test only)\nAfter=kubelet.service\n\n\
[Service]\nStandardOutput=journal+console\n\
ExecStart=/bin/sh -c 'sleep 300; while :; do \
crictl --runtime-endpoint unix:///run/containerd/containerd.sock ps -a 2>/dev/null | tail -n +2 | sed \"s/^/SLIPWAY-TEST-STATUS crictl: /\"; \
systemctl --no-pager --failed --plain --no-legend 2>&1 | sed \"s/^/SLIPWAY-TEST-STATUS failed: /\"; \
for c in $$(crictl --runtime-endpoint unix:///run/containerd/containerd.sock ps -a -q --state exited --name \"kube-apiserver|etcd\" 2>/dev/null | head -n 2); do \
crictl --runtime-endpoint unix:///run/containerd/containerd.sock logs --tail 3 $$c 2>&1 | cut -c1-400 | sed \"s/^/SLIPWAY-TEST-STATUS exited $$c: /\"; done; \
journalctl -q -u kubelet -n 300 --no-pager 2>&1 | grep -E \" E[0-9]{4} |rror|ailed\" | grep -v -e \"mirror pod\" -e \"config path\" | tail -n 4 | sed \"s/.*err=//\" | cut -c1-600 | sed \"s/^/SLIPWAY-TEST-STATUS kubelet: /\"; \
sleep 120; done'\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Master,
    Node,
}

/// An EC2 instance of the stack, as moto has it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub role: Role,
    pub ip: Ipv4Addr,
    pub az: String,
    /// The AMI it was launched from.
    pub image: String,
    /// Its `slipway:release` tag.
    pub release: String,
}

/// How many Nodes `kubectl get nodes` lists as Ready (0 while the API
/// server does not answer).
fn ready_nodes(kubeconfig: &std::path::Path) -> usize {
    let out = std::process::Command::new(crate::fixtures_bin("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout=10s", "get", "nodes", "--no-headers"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
            .count(),
        _ => 0,
    }
}

/// Options for bringing a cluster up.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub master_memory_mib: u32,
    pub node_memory_mib: u32,
    pub master_cpus: u32,
    pub node_cpus: u32,
    /// Where disks, logs and the kubeconfig go (kept after the run).
    pub dir: PathBuf,
    /// The share of the members' AWS calls the fault proxy fails
    /// (throttling, 500s, resets; see [`crate::faults`]).
    pub fault_rate: f64,
    /// A second image, published as the next release (before IAM is
    /// enforced) for [`Cluster::update_stack`] to move the stack to.
    pub next: Option<Image>,
}

impl Options {
    /// One master and one node, sized to run both under TCG on two cores:
    /// the control plane gets two vCPUs, the node one, so the node's
    /// emulation never takes more than one of the host's cores from it. A
    /// one-vCPU master was tried: its load average passed 14 and its
    /// add-ons were still not applied 14 minutes after boot.
    pub fn master_and_node(dir: PathBuf) -> Self {
        Self {
            nodes: 1,
            master_memory_mib: 3072,
            node_memory_mib: 2048,
            master_cpus: 2,
            node_cpus: 1,
            dir,
            fault_rate: 0.0,
            next: None,
        }
    }
}

/// Hot-plug ports a master's VM has: volumes attached while it runs (a
/// restore's, a person's second).
const HOTPLUG_PORTS: u8 = 2;

/// The file behind an EBS volume, below `dir`: created blank once, kept
/// across instances.
fn volume_file(dir: &Path, id: &str, gib: i32) -> Result<PathBuf> {
    let path = dir.join(format!("{id}.raw"));
    if !path.exists() {
        let f = std::fs::File::create(&path)?;
        f.set_len(u64::try_from(gib)? << 30)?;
    }
    Ok(path)
}

/// Plays EBS for one master: every second, each volume EC2 says is
/// attached to the instance and is not in its VM yet is plugged in as an
/// NVMe controller with the volume ID as serial. A volume made from an EBS
/// snapshot would need the snapshot's data, which the harness does not
/// hold: such a volume is plugged in blank and said (the master then
/// refuses it, as a blank volume under an existing cluster). Stops when
/// dropped.
struct Attacher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attacher {
    fn start(
        instance: String,
        monitor: crate::Monitor,
        mut plugged: Vec<String>,
        ec2: aws_sdk_ec2::Client,
        rt: tokio::runtime::Handle,
        dir: PathBuf,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                let attached = rt.block_on(
                    ec2.describe_volumes()
                        .filters(
                            aws_sdk_ec2::types::Filter::builder()
                                .name("attachment.instance-id")
                                .values(&instance)
                                .build(),
                        )
                        .send(),
                );
                for v in attached.iter().flat_map(|a| a.volumes()) {
                    let id = v.volume_id().unwrap_or_default();
                    let serial = id.replace('-', "");
                    // The instance's root volume (moto makes one) is the
                    // VM's own disk already.
                    let data = v
                        .attachments()
                        .iter()
                        .filter(|a| a.instance_id() == Some(instance.as_str()))
                        .any(|a| {
                            a.device()
                                .is_some_and(slipway_init::steps::volume::is_data_device)
                        });
                    if id.is_empty() || !data || plugged.contains(&serial) {
                        continue;
                    }
                    if let Some(snap) = v.snapshot_id().filter(|s| !s.is_empty()) {
                        if !dir.join(format!("{id}.raw")).exists() {
                            say(&format!(
                                "{id} is made from {snap}, whose data the harness does not hold: plugged in blank"
                            ));
                        }
                    }
                    let plug = volume_file(&dir, id, v.size().unwrap_or(8)).and_then(|file| {
                        monitor.plug_disk(&Disk {
                            file,
                            format: "raw",
                            serial: serial.clone(),
                        })
                    });
                    match plug {
                        Ok(()) => {
                            say(&format!("{id} attached to {instance}: plugged into its VM"));
                            plugged.push(serial);
                        }
                        Err(e) => say(&format!("plugging {id} into {instance}'s VM: {e:#}")),
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The physical ID of a resource of the stack.
async fn physical_id(cfn: &aws_sdk_cloudformation::Client, logical: &str) -> Result<String> {
    // The whole list: moto's DescribeStackResource fails outright on a
    // stack holding a resource type it does not model (the subnet's CIDR
    // reservation).
    let r = cfn
        .describe_stack_resources()
        .stack_name(STACK)
        .send()
        .await?;
    r.stack_resources()
        .iter()
        .find(|s| s.logical_resource_id() == Some(logical))
        .and_then(|s| s.physical_resource_id())
        .map(str::to_owned)
        .with_context(|| format!("stack resource {logical} has no physical ID"))
}

/// A running cluster. Dropping it kills every VM and service it started.
pub struct Cluster {
    // Dropped first: what plugs disks into the VMs, the VMs, then what
    // they talk to.
    attachers: BTreeMap<String, Attacher>,
    pub vms: BTreeMap<String, Vm>,
    /// Route 53's private zone, answered in the network.
    resolver: Resolver,
    pub opts: Options,
    rt: tokio::runtime::Runtime,
    conf: aws_config::SdkConfig,
    pub outputs: BTreeMap<String, String>,
    /// Each published AMI's disk, read back from its snapshot.
    disks: BTreeMap<String, PathBuf>,
    /// The release the stack was created from, and the next one.
    pub release: Release,
    pub next_release: Option<(Release, PathBuf)>,
    pub lan: Lan,
    imds: Imds,
    /// Each role's name and the session its instances are handed.
    roles: BTreeMap<Role, (String, Identity)>,
    /// Each instance's root volume, as the stack's launch templates ask.
    root_volume_gib: u64,
    aws_in_lan: String,
    user_data: BTreeMap<&'static str, String>,
    forwards: Vec<Forward>,
    api: Option<Forward>,
    // Last: moto outlives the forwarders and the fault proxy that reach it.
    _forward_aws: Forward,
    faults: FaultProxy,
    moto: Moto,
    pub timings: Vec<(String, Duration)>,
    /// How much slower than a quiet machine this run is (1 until measured).
    pace: f64,
}

/// A run slower than this many times a quiet machine is broken, not slow:
/// the waits stop stretching there.
const MAX_PACE: f64 = 3.0;

/// The pace of a run in which a step took `measured` that takes `quiet`
/// on a quiet machine: at least 1, at most [`MAX_PACE`].
pub fn pace(measured: Duration, quiet: Duration) -> f64 {
    (measured.as_secs_f64() / quiet.as_secs_f64().max(1e-3)).clamp(1.0, MAX_PACE)
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.opts.dir)
            .field("vms", &self.vms.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn say(what: &str) {
    eprintln!("[cluster] {what}");
}

impl Cluster {
    /// Publishes `image` to a fresh moto, reads the snapshot back, creates
    /// the stack and the network. No VM runs yet (see [`Cluster::launch`]).
    pub fn create(image: &Image, opts: Options) -> Result<Self> {
        let started = Instant::now();
        std::fs::create_dir_all(&opts.dir)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let moto = Moto::start()?;
        let conf = rt.block_on(
            slipway_init::sdk::config_loader()
                .region(aws_config::Region::new(REGION))
                .endpoint_url(&moto.endpoint)
                .load(),
        );

        say("publishing the image to the local AWS");
        let out = opts.dir.join("release");
        let mut disks = BTreeMap::new();
        let release = publish(
            &rt,
            &moto,
            image,
            &out,
            None,
            &opts.dir.join("ami.raw"),
            &mut disks,
        )?;
        let next_release = match &opts.next {
            Some(next) => {
                say("publishing the next release");
                let dir = opts.dir.join("release-next");
                let disk = opts.dir.join("ami-next.raw");
                let current = Some(release.kubernetes.as_str());
                let next = publish(&rt, &moto, next, &dir, current, &disk, &mut disks)?;
                Some((next, dir))
            }
            None => None,
        };

        say("creating the stack from the rendered template");
        let template_body = std::fs::read_to_string(out.join("template.json"))?;
        let outputs = rt.block_on(create_stack(&conf, &template_body, opts.nodes))?;

        say("enforcing IAM: each role as the template writes it, the test as administrator");
        let template: serde_json::Value = serde_json::from_str(&template_body)?;
        let roles = rt.block_on(roles_of_the_stack(&conf, &moto, &template))?;
        rt.block_on(tag_as_the_template_does(&conf, &template, "MasterVolume"))?;
        let root_volume_gib = template["Parameters"]["RootVolumeSize"]["Default"]
            .as_u64()
            .context("the template's RootVolumeSize has no default")?;
        let administrator = moto.administrator()?;
        moto.enforce_iam()?;
        let conf = rt.block_on(
            slipway_init::sdk::config_loader()
                .region(aws_config::Region::new(REGION))
                .endpoint_url(&moto.endpoint)
                .credentials_provider(administrator.credentials())
                .load(),
        );

        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let subnets = rt.block_on(async {
            let d = ec2.describe_subnets().send().await?;
            let mut nets = Vec::new();
            for s in d.subnets() {
                let cidr = s.cidr_block().unwrap_or_default();
                if let Some((net, prefix)) = cidr.split_once('/') {
                    nets.push((net.parse::<Ipv4Addr>()?, prefix.parse::<u8>()?));
                }
            }
            anyhow::Ok(nets)
        })?;
        ensure!(!subnets.is_empty(), "the stack created no subnets");
        let lan = Lan::create(&subnets, &opts.dir)?;
        let router = lan.routers[0].0;
        // The members reach moto through the fault proxy; the test's own
        // calls go to moto directly.
        let mut plan = Plan::random(
            opts.fault_rate,
            FAULT_SEED,
            [Kind::Throttle, Kind::ServerError, Kind::Reset],
        );
        if opts.fault_rate > 0.0 {
            // Every action the members make meets at least one fault.
            plan = plan.and_first_of_each();
        }
        let faults = FaultProxy::start(&moto.endpoint, plan)?;
        let resolver = Resolver::start(faults.records(), lan.names());
        let proxy_addr: SocketAddr = faults.endpoint.trim_start_matches("http://").parse()?;
        let forward_aws = lan.forward_in(SocketAddr::from((router, AWS_PORT)), proxy_addr)?;
        let imds = Imds::serve(lan.listen(SocketAddr::from((IMDS_ADDR, 80)))?, [])?;

        let mut cluster = Self {
            aws_in_lan: format!("http://{router}:{AWS_PORT}"),
            opts,
            rt,
            conf,
            outputs,
            disks,
            release,
            next_release,
            lan,
            imds,
            roles,
            root_volume_gib,
            user_data: BTreeMap::new(),
            attachers: BTreeMap::new(),
            vms: BTreeMap::new(),
            resolver,
            forwards: Vec::new(),
            api: None,
            _forward_aws: forward_aws,
            faults,
            moto,
            timings: Vec::new(),
            pace: 1.0,
        };
        cluster.load_user_data()?;
        cluster.timing("publish, read back, stack", started.elapsed());
        Ok(cluster)
    }

    /// What the fault proxy saw and injected, per (service, action).
    pub fn faults(&self) -> &FaultProxy {
        &self.faults
    }

    /// An error if a guest is gone: its kernel died, its QEMU exited, or
    /// it has printed nothing for [`GUEST_SILENCE`]. None of them comes
    /// back, so waiting on is pointless; `what` names the wait that
    /// noticed. The emulator's faults are named in words `just
    /// cluster-test` recognises.
    pub fn guests_alive(&self, what: &str) -> Result<()> {
        for (id, vm) in &self.vms {
            if vm.seen(GUEST_PANIC).is_some() {
                bail!(
                    "{what}: {EMULATOR_FAULT}: {id}'s kernel panicked\n{}",
                    vm.tail(60)
                );
            }
            if vm.exited() {
                bail!(
                    "{what}: {id} powered off or its QEMU exited\n{}",
                    vm.tail(60)
                );
            }
            let silent = vm.silent_for();
            if silent > GUEST_SILENCE {
                let status = vm
                    .qmp("query-status")
                    .unwrap_or_else(|e| format!("no answer: {e:#}"));
                bail!(
                    "{what}: {EMULATOR_FAULT}: {id} has printed nothing for {}s (QEMU's status: {status})\n{}",
                    silent.as_secs(),
                    vm.tail(60)
                );
            }
        }
        Ok(())
    }

    /// Sets the run's pace from a step that took `measured` here and
    /// `quiet` on a quiet machine (see [`pace`]); the tests' fixed waits
    /// are stretched by it from then on, so a slow run is slow, not red.
    pub fn set_pace(&mut self, what: &str, measured: Duration, quiet: Duration) {
        self.pace = pace(measured, quiet);
        say(&format!(
            "pace: {what} took {:.0}s ({:.0}s on a quiet machine): waits from here ×{:.2}",
            measured.as_secs_f64(),
            quiet.as_secs_f64(),
            self.pace
        ));
    }

    /// `deadline` stretched by the run's pace.
    pub fn paced(&self, deadline: Duration) -> Duration {
        deadline.mul_f64(self.pace)
    }

    pub fn timing(&mut self, what: &str, took: Duration) {
        say(&format!("{what}: {:.1}s", took.as_secs_f64()));
        self.timings.push((what.to_owned(), took));
    }

    fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.conf)
    }

    /// The launch templates' user data, by role.
    fn load_user_data(&mut self) -> Result<()> {
        let cfn = aws_sdk_cloudformation::Client::new(&self.conf);
        let ec2 = self.ec2();
        let data = self.rt.block_on(async {
            let mut data = BTreeMap::new();
            for (role, logical) in [
                ("master", "MasterLaunchTemplate"),
                ("node", "NodeLaunchTemplate"),
            ] {
                let id = physical_id(&cfn, logical).await?;
                let v = ec2
                    .describe_launch_template_versions()
                    .launch_template_id(&id)
                    .versions("$Latest")
                    .send()
                    .await?;
                let b64 = v
                    .launch_template_versions()
                    .first()
                    .and_then(|v| v.launch_template_data())
                    .and_then(|d| d.user_data())
                    .context("launch template without user data")?
                    .to_owned();
                let text = String::from_utf8(
                    base64::engine::general_purpose::STANDARD.decode(b64.trim())?,
                )?;
                data.insert(role, text);
            }
            anyhow::Ok(data)
        })?;
        self.user_data = data;
        Ok(())
    }

    /// The stack's running instances, masters first.
    pub fn instances(&self) -> Result<Vec<Instance>> {
        let ec2 = self.ec2();
        let mut all = self.rt.block_on(async {
            let d = ec2
                .describe_instances()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("instance-state-name")
                        .values("running")
                        .values("pending")
                        .build(),
                )
                .send()
                .await?;
            let mut out = Vec::new();
            for i in d.reservations().iter().flat_map(|r| r.instances()) {
                let tag = |k: &str| {
                    i.tags()
                        .iter()
                        .find(|t| t.key() == Some(k))
                        .and_then(|t| t.value())
                        .map(str::to_owned)
                };
                let role = match tag("slipway:role").as_deref() {
                    Some("master") => Role::Master,
                    Some("node") => Role::Node,
                    _ => continue,
                };
                out.push(Instance {
                    id: i.instance_id().unwrap_or_default().to_owned(),
                    role,
                    ip: i.private_ip_address().unwrap_or_default().parse()?,
                    az: i
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .unwrap_or_default()
                        .to_owned(),
                    image: i.image_id().unwrap_or_default().to_owned(),
                    release: tag("slipway:release").unwrap_or_default(),
                });
            }
            anyhow::Ok(out)
        })?;
        all.sort_by_key(|i| (i.role == Role::Node, i.id.clone()));
        Ok(all)
    }

    /// Boots the stack's master and its first node, as a fresh stack
    /// launches them; returns the master's instance ID.
    pub fn launch_master_and_node(&mut self) -> Result<String> {
        let mut master = None;
        let mut node = false;
        for i in self.instances()? {
            if i.role == Role::Master && master.is_none() {
                master = Some(i.id.clone());
                self.launch(&i)?;
            } else if i.role == Role::Node && !node {
                node = true;
                self.launch(&i)?;
            }
        }
        master.context("the stack launched no master")
    }

    /// Waits until `count` Nodes are Ready, giving up after `deadline` or
    /// once `stop` says so; returns the administrator's kubeconfig.
    pub fn wait_for_ready_nodes(
        &mut self,
        count: usize,
        deadline: Duration,
        stop: impl Fn() -> bool,
    ) -> Result<PathBuf> {
        let start = Instant::now();
        let admin = format!("{}/admin.conf", self.config_value("cluster_name")?);
        loop {
            if stop() {
                bail!("stopped before {count} Nodes were Ready");
            }
            if start.elapsed() > deadline {
                bail!("{count} Nodes were not Ready within {deadline:?}");
            }
            if self.get_object(&admin).is_ok() {
                let kubeconfig = self.kubeconfig()?;
                if ready_nodes(&kubeconfig) >= count {
                    return Ok(kubeconfig);
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Teaches the metadata emulator the instance and boots its VM.
    pub fn launch(&mut self, instance: &Instance) -> Result<()> {
        self.launch_with(instance, &[])
    }

    /// [`Cluster::launch`], with test-only drop-ins for the image's units:
    /// (unit name, drop-in text), passed as systemd credentials.
    pub fn launch_with(&mut self, instance: &Instance, dropins: &[(&str, &str)]) -> Result<()> {
        let role = match instance.role {
            Role::Master => "master",
            Role::Node => "node",
        };
        let user_data = self.user_data[role].clone();
        let ip = std::net::IpAddr::V4(instance.ip);
        let (role_name, session) = &self.roles[&instance.role];
        for (path, body) in [
            ("/latest/meta-data/instance-id", instance.id.clone()),
            (
                "/latest/meta-data/placement/availability-zone",
                instance.az.clone(),
            ),
            ("/latest/meta-data/placement/region", REGION.to_owned()),
            ("/latest/meta-data/local-ipv4", instance.ip.to_string()),
            ("/latest/user-data", user_data),
            (
                "/latest/meta-data/iam/security-credentials/",
                role_name.clone(),
            ),
            (
                &format!("/latest/meta-data/iam/security-credentials/{role_name}"),
                session.imds_document(),
            ),
        ] {
            self.imds.set_for(ip, path, &body);
        }

        // A fresh root volume from the AMI's snapshot, as EC2 gives every
        // instance: as large as the launch template asks, larger than the
        // image (its /var grows into the rest).
        let root = self.opts.dir.join(format!("{}-root.qcow2", instance.id));
        let image = self.disks.get(&instance.image).with_context(|| {
            format!(
                "{} runs {}, which no release published",
                instance.id, instance.image
            )
        })?;
        crate::create_volume(image, "raw", &root, self.root_volume_gib)?;

        let mut cfg = VmConfig::new(&instance.id, root, "qcow2")
            .with_test_unit("slipway-test-status.service", STATUS_UNIT)
            .with_shell(self.opts.dir.join(format!("{}.shell", instance.id)));
        // The local AWS, for every unit that calls AWS.
        let endpoint = format!(
            "[Service]\nEnvironment=SLIPWAY_AWS_ENDPOINT={}\n",
            self.aws_in_lan
        );
        let mut units: BTreeMap<&str, String> =
            AWS_UNITS.iter().map(|u| (*u, endpoint.clone())).collect();
        for (unit, text) in dropins {
            units
                .entry(unit)
                .and_modify(|t| t.push_str(text))
                .or_insert_with(|| (*text).to_owned());
        }
        for (unit, text) in units {
            cfg.credentials
                .push((format!("systemd.unit-dropin.{unit}"), text.into_bytes()));
        }
        cfg.snapshot = false;
        (cfg.cpus, cfg.memory_mib) = match instance.role {
            Role::Master => (self.opts.master_cpus, self.opts.master_memory_mib),
            Role::Node => (self.opts.node_cpus, self.opts.node_memory_mib),
        };
        let mut at_boot = Vec::new();
        if instance.role == Role::Master {
            // The cluster's volume, if it has one, is there from the start
            // (slipway-init still calls AttachVolume before it looks);
            // one the master makes at boot (a restore) is plugged in when
            // it is attached.
            if let Some((id, gib)) = self.master_volume()? {
                let serial = id.replace('-', "");
                cfg.disks.push(Disk {
                    file: volume_file(&self.opts.dir, &id, gib)?,
                    format: "raw",
                    serial: serial.clone(),
                });
                at_boot.push(serial);
            }
            cfg.hotplug_ports = HOTPLUG_PORTS;
        }
        cfg.nic = Nic::Tap {
            netns: self.lan.ns.name.clone(),
            port: self.lan.port(instance.ip)?,
        };
        say(&format!(
            "booting {} ({:?}, {})",
            instance.id, instance.role, instance.ip
        ));
        let vm = Vm::boot(&cfg)?;
        if instance.role == Role::Master {
            let attacher = Attacher::start(
                instance.id.clone(),
                vm.monitor(),
                at_boot,
                self.ec2(),
                self.rt.handle().clone(),
                self.opts.dir.clone(),
            );
            self.attachers.insert(instance.id.clone(), attacher);
        }
        self.vms.insert(instance.id.clone(), vm);
        Ok(())
    }

    /// The cluster's current data volume (tagged `slipway:etcd-data` and
    /// not superseded, as the master finds it): its ID and size in GiB.
    fn master_volume(&self) -> Result<Option<(String, i32)>> {
        let ec2 = self.ec2();
        let cluster = self.config_value("cluster_name")?;
        self.rt.block_on(async {
            let found = ec2
                .describe_volumes()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("tag:slipway:etcd-data")
                        .values(&cluster)
                        .build(),
                )
                .send()
                .await?;
            Ok(found
                .volumes()
                .iter()
                .find(|v| {
                    !v.tags()
                        .iter()
                        .any(|t| t.key() == Some("slipway:superseded"))
                })
                .map(|v| {
                    (
                        v.volume_id().unwrap_or_default().to_owned(),
                        v.size().unwrap_or(8),
                    )
                }))
        })
    }

    /// The ID of the cluster's current data volume, if there is one.
    pub fn master_volume_id(&self) -> Result<Option<String>> {
        Ok(self.master_volume()?.map(|(id, _)| id))
    }

    /// An SSM parameter's value, as an administrator reads it.
    pub fn parameter(&self, name: &str) -> Result<String> {
        let ssm = aws_sdk_ssm::Client::new(&self.conf);
        let got = self
            .rt
            .block_on(ssm.get_parameter().name(name).send())
            .with_context(|| format!("reading the SSM parameter {name}"))?;
        got.parameter()
            .and_then(|p| p.value())
            .map(str::to_owned)
            .with_context(|| format!("the SSM parameter {name} has no value"))
    }

    /// The data volume's file (for scanning it at rest).
    pub fn master_volume_file(&self) -> Result<PathBuf> {
        let (id, gib) = self
            .master_volume()?
            .context("no volume is tagged as the cluster's etcd data")?;
        volume_file(&self.opts.dir, &id, gib)
    }

    /// Deletes a volume in EC2, detaching it first (forced: its instance
    /// is gone): the volume is lost, as with its zone.
    pub fn lose_volume(&self, id: &str) -> Result<()> {
        let ec2 = self.ec2();
        self.rt.block_on(async {
            let _ = ec2.detach_volume().volume_id(id).force(true).send().await;
            ec2.delete_volume().volume_id(id).send().await?;
            anyhow::Ok(())
        })?;
        say(&format!("lost volume {id}"));
        Ok(())
    }

    /// Kills an instance's VM and terminates it in EC2 without lowering the
    /// group's capacity, so its Auto Scaling group launches a replacement.
    pub fn terminate(&mut self, id: &str) -> Result<()> {
        drop(self.attachers.remove(id));
        if let Some(vm) = self.vms.remove(id) {
            drop(vm);
        }
        let asg = aws_sdk_autoscaling::Client::new(&self.conf);
        let ec2 = self.ec2();
        self.rt.block_on(async {
            asg.terminate_instance_in_auto_scaling_group()
                .instance_id(id)
                .should_decrement_desired_capacity(false)
                .send()
                .await?;
            // moto may only mark it; make sure EC2 sees it gone.
            let _ = ec2.terminate_instances().instance_ids(id).send().await;
            anyhow::Ok(())
        })?;
        say(&format!("terminated {id}"));
        Ok(())
    }

    /// Has the master group launch its next instance outside `lost` (in
    /// the stack's subnet of another zone), as Auto Scaling does when a
    /// zone of the group is down; returns that zone. A stand-in: moto
    /// launches every instance of a group in its first subnet and knows no
    /// zone's health, so the test narrows the group to the other subnet.
    pub fn masters_leave_zone(&self, lost: &str) -> Result<String> {
        let cfn = aws_sdk_cloudformation::Client::new(&self.conf);
        let asg = aws_sdk_autoscaling::Client::new(&self.conf);
        let ec2 = self.ec2();
        self.rt.block_on(async {
            let group = physical_id(&cfn, "MasterGroup").await?;
            // The stack's own subnets (moto's default VPC has more).
            let mut ids = Vec::new();
            for logical in ["SubnetA", "SubnetB"] {
                ids.push(physical_id(&cfn, logical).await?);
            }
            let subnets = ec2
                .describe_subnets()
                .set_subnet_ids(Some(ids))
                .send()
                .await?;
            let (subnet, zone) = subnets
                .subnets()
                .iter()
                .filter_map(|s| Some((s.subnet_id()?, s.availability_zone()?)))
                .find(|(_, zone)| *zone != lost)
                .with_context(|| format!("the stack has no subnet outside {lost}"))?;
            asg.update_auto_scaling_group()
                .auto_scaling_group_name(&group)
                .vpc_zone_identifier(subnet)
                .send()
                .await?;
            say(&format!(
                "{group} launches in {zone} ({subnet}) from now on"
            ));
            anyhow::Ok(zone.to_owned())
        })
    }

    /// Waits for the Auto Scaling group to put a new instance of `role` in
    /// service (one not in `known`).
    pub fn replacement(
        &self,
        role: Role,
        known: &[String],
        deadline: Duration,
    ) -> Result<Instance> {
        let start = Instant::now();
        loop {
            if let Some(i) = self
                .instances()?
                .into_iter()
                .find(|i| i.role == role && !known.contains(&i.id))
            {
                return Ok(i);
            }
            if start.elapsed() > deadline {
                bail!("no replacement {role:?} instance within {deadline:?}");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Where `port` on the master is now: at the address the API's name
    /// has (the master's in its zone), asked at each connection.
    fn master_target(&self, port: u16) -> Result<Target> {
        let name = self.config_value("api_name")?;
        let records = std::sync::Arc::clone(&self.resolver.records);
        Ok(std::sync::Arc::new(move || {
            Resolver::lookup(&records, &name).map(|ip| SocketAddr::from((ip, port)))
        }))
    }

    /// The address the API's name has now: the current master's.
    pub fn master_address(&self) -> Result<Ipv4Addr> {
        let name = self.config_value("api_name")?;
        Resolver::lookup(&self.resolver.records, &name)
            .with_context(|| format!("{name} has no A record in the stack's hosted zone"))
    }

    /// The administrator's kubeconfig from the secrets bucket, pointed at a
    /// loopback forwarder to the master (wherever the API's name points);
    /// written to the run directory, and its path returned.
    pub fn kubeconfig(&mut self) -> Result<PathBuf> {
        if self.api.is_none() {
            let to = self.master_target(6443)?;
            self.api = Some(self.lan.forward_out(to)?);
        }
        let local = self
            .api
            .as_ref()
            .map(|f| f.local)
            .context("api forwarder")?;
        let key = format!("{}/admin.conf", self.config_value("cluster_name")?);
        let text = String::from_utf8(self.get_object(&key)?)?;
        let rewritten: String = text
            .lines()
            .map(|l| match l.trim_start().strip_prefix("server: ") {
                Some(_) => format!("    server: https://{local}"),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        self.write_private("kubeconfig", rewritten.as_bytes())
    }

    /// An S3 client and the stack's secrets bucket.
    fn secrets_bucket(&self) -> Result<(aws_sdk_s3::Client, String)> {
        let bucket = self
            .outputs
            .get("SecretsBucketName")
            .context("stack output SecretsBucketName")?
            .clone();
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.conf)
                .force_path_style(true)
                .build(),
        );
        Ok((s3, bucket))
    }

    /// An object from the secrets bucket.
    pub fn get_object(&self, key: &str) -> Result<Vec<u8>> {
        Ok(self.get_object_with_metadata(key)?.0)
    }

    /// The keys under `prefix` in the secrets bucket, in S3's order (by
    /// key), as an administrator lists them.
    pub fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let (s3, bucket) = self.secrets_bucket()?;
        self.rt.block_on(async {
            let out = s3
                .list_objects_v2()
                .bucket(&bucket)
                .prefix(prefix)
                .send()
                .await
                .with_context(|| format!("listing s3://{bucket}/{prefix}"))?;
            Ok(out
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned))
                .collect())
        })
    }

    /// An object of the secrets bucket with its user metadata.
    pub fn get_object_with_metadata(
        &self,
        key: &str,
    ) -> Result<(Vec<u8>, BTreeMap<String, String>)> {
        let (s3, bucket) = self.secrets_bucket()?;
        self.rt.block_on(async {
            let o = s3
                .get_object()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .with_context(|| format!("s3://{bucket}/{key}"))?;
            let meta = o
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            Ok((o.body.collect().await?.into_bytes().to_vec(), meta))
        })
    }

    /// Replaces an object in the secrets bucket.
    pub fn put_object(&self, key: &str, body: Vec<u8>) -> Result<()> {
        let (s3, bucket) = self.secrets_bucket()?;
        self.rt.block_on(async {
            s3.put_object()
                .bucket(&bucket)
                .key(key)
                .body(body.into())
                .send()
                .await
                .with_context(|| format!("writing s3://{bucket}/{key}"))?;
            Ok(())
        })
    }

    /// The stack config a member of `role` reads (its user data, without
    /// the test's endpoint).
    pub fn user_data(&self, role: Role) -> &str {
        match role {
            Role::Master => &self.user_data["master"],
            Role::Node => &self.user_data["node"],
        }
    }

    /// A value from the master's stack config (the user data).
    pub fn config_value(&self, key: &str) -> Result<String> {
        let text = &self.user_data["master"];
        let table: toml::Table = text.parse()?;
        table
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .with_context(|| format!("`{key}` is not in the master's user data"))
    }

    /// A loopback port forwarded to `port` on the master (wherever the
    /// API's name points).
    pub fn forward_to_master(&mut self, port: u16) -> Result<SocketAddr> {
        let to = self.master_target(port)?;
        let f = self.lan.forward_out(to)?;
        let local = f.local;
        self.forwards.push(f);
        Ok(local)
    }

    /// The stack's API endpoint (the Elastic IP, which moto allocates on
    /// loopback) made real on the test's side: its port 6443 forwards to
    /// the master's API server, as EC2 maps the address to the instance.
    /// Returns the address.
    pub fn serve_elastic_ip(&mut self) -> Result<SocketAddr> {
        let endpoint = self
            .outputs
            .get("ApiEndpoint")
            .context("stack output ApiEndpoint")?;
        let eip: SocketAddr = endpoint
            .trim_start_matches("https://")
            .parse()
            .with_context(|| format!("ApiEndpoint {endpoint}"))?;
        let to = self.master_target(6443)?;
        let f = self.lan.forward_out_at(eip, to)?;
        self.forwards.push(f);
        Ok(eip)
    }

    /// Writes `content` to `name` in the run directory, readable by its
    /// owner only (it holds credentials).
    fn write_private(&self, name: &str, content: &[u8]) -> Result<PathBuf> {
        let path = self.opts.dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(content)?;
        Ok(path)
    }

    /// An object of the secrets bucket saved to `name` in the run directory
    /// (mode 0600), as an administrator downloads it.
    pub fn download(&self, key: &str, name: &str) -> Result<PathBuf> {
        self.write_private(name, &self.get_object(key)?)
    }

    /// Moto's endpoint on the test's side.
    pub fn aws_endpoint(&self) -> &str {
        &self.moto.endpoint
    }

    /// Runs `command` as root in `id`'s guest, through the test-only shell
    /// on its `/dev/hvc0`, with the local AWS as the units see it
    /// (`SLIPWAY_AWS_ENDPOINT`), and returns what it printed. Fails when the
    /// command exits non-zero, or has not finished within `deadline`.
    pub fn run_in_guest(&self, id: &str, command: &str, deadline: Duration) -> Result<String> {
        let socket = self.opts.dir.join(format!("{id}.shell"));
        let command = format!("SLIPWAY_AWS_ENDPOINT={} {command}", self.aws_in_lan);
        shell::run(&socket, &command, deadline).with_context(|| format!("in {id}: {command}"))
    }
}

/// A guest's root shell, driven over the Unix socket QEMU serves it on.
mod shell {
    use anyhow::{bail, Context, Result};
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    pub fn run(socket: &Path, command: &str, deadline: Duration) -> Result<String> {
        let started = Instant::now();
        let mut stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                // The socket appears once QEMU runs.
                Err(_) if started.elapsed() < deadline => {
                    std::thread::sleep(Duration::from_secs(1))
                }
                Err(e) => return Err(e).context(format!("connecting to {}", socket.display())),
            }
        };
        stream.set_read_timeout(Some(Duration::from_millis(300)))?;
        // What the console printed before this (a prompt, a login) is not
        // this command's.
        let mut buf = Vec::new();
        read_some(&mut stream, &mut buf)?;
        buf.clear();
        // Unique to this command, so output left from an earlier one
        // never ends it.
        let tag = format!(
            "{:x}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            std::process::id()
        );
        // The marker is split on the typed line, so its echo never matches.
        writeln!(
            stream,
            "{{ {command} ; }} 2>&1 </dev/null; echo \"SLIPWAY-SHELL\"\"-{tag}:$?\""
        )?;
        let marker = format!("SLIPWAY-SHELL-{tag}:");
        loop {
            read_some(&mut stream, &mut buf)?;
            let text = String::from_utf8_lossy(&buf);
            if let Some(at) = text.find(&marker) {
                let rest = &text[at + marker.len()..];
                let code: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if rest.len() > code.len() && !code.is_empty() {
                    // After the echo of the typed line, if the console echoes.
                    let start = text[..at].rfind(&format!("-{tag}:$?")).map_or(0, |typed| {
                        text[typed..at].find('\n').map_or(at, |n| typed + n + 1)
                    });
                    let output = plain(&text[start..at]);
                    if code != "0" {
                        bail!("exited {code}: {}", output.trim());
                    }
                    return Ok(output);
                }
            }
            if started.elapsed() >= deadline {
                bail!(
                    "not finished within {deadline:?}; it printed: {}",
                    String::from_utf8_lossy(&buf).trim()
                );
            }
        }
    }

    /// `text` without carriage returns and terminal escapes (bash's
    /// bracketed-paste switches).
    fn plain(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '\r' => {}
                '\u{1b}' => {
                    // CSI: ESC [ parameters, then a final letter.
                    if chars.next() == Some('[') {
                        for c in chars.by_ref() {
                            if c.is_ascii_alphabetic() {
                                break;
                            }
                        }
                    }
                }
                c => out.push(c),
            }
        }
        out.trim_start_matches('\n').to_owned()
    }

    /// Whatever the shell has printed until it pauses.
    fn read_some(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<()> {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => bail!("the guest's shell closed"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::os::fd::OwnedFd;
        use std::os::unix::net::UnixListener;
        use std::process::{Command, Stdio};

        /// A shell behind a socket, as QEMU serves a guest's console; a
        /// real terminal would also echo what is typed.
        fn serve(socket: &Path) -> std::thread::JoinHandle<()> {
            let listener = UnixListener::bind(socket).unwrap();
            std::thread::spawn(move || {
                while let Ok((stream, _)) = listener.accept() {
                    let input = OwnedFd::from(stream.try_clone().unwrap());
                    let output = OwnedFd::from(stream);
                    let mut shell = Command::new("bash")
                        .args(["--norc", "--noprofile"])
                        .stdin(Stdio::from(input))
                        .stdout(Stdio::from(output))
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    // One command per connection is all a test sends.
                    std::thread::spawn(move || shell.wait());
                }
            })
        }

        #[test]
        fn a_command_run_in_a_guest_gives_its_output_or_its_failure() {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("guest.shell");
            let _server = serve(&socket);
            let wait = Duration::from_secs(20);
            let out = run(
                &socket,
                "printf '\\033[?2004lone\\r\\n'; echo two >&2",
                wait,
            )
            .unwrap();
            assert_eq!(out.lines().collect::<Vec<_>>(), ["one", "two"]);
            let err = run(&socket, "echo no such backup; false", wait).unwrap_err();
            assert!(
                format!("{err:#}").contains("exited 1: no such backup"),
                "{err:#}"
            );
            let err = run(&socket, "sleep 5", Duration::from_secs(1)).unwrap_err();
            assert!(
                format!("{err:#}").contains("not finished within"),
                "{err:#}"
            );
        }
    }
}

/// Publishes `image` to moto as `image-builder publish` does, into `out`
/// (the disk linked, not copied), reads its snapshot back into `disk` and
/// records that as its AMI's disk in `disks`.
fn publish(
    rt: &tokio::runtime::Runtime,
    moto: &Moto,
    image: &Image,
    out: &Path,
    current_kubernetes: Option<&str>,
    disk: &Path,
    disks: &mut BTreeMap<String, PathBuf>,
) -> Result<Release> {
    std::fs::create_dir_all(out)?;
    let disk_link = out.join("disk.raw");
    let _ = std::fs::remove_file(&disk_link);
    std::os::unix::fs::symlink(image.raw().canonicalize()?, &disk_link)?;
    std::fs::copy(
        image.dir.join("build-manifest.json"),
        out.join("build-manifest.json"),
    )?;
    let target = image_builder::publish::Target {
        region: Some(REGION.into()),
        copy_to: Vec::new(),
        template: None,
        ssm_prefix: None,
        current_kubernetes: current_kubernetes.map(str::to_owned),
        upload_concurrency: 8,
        endpoint_url: Some(moto.endpoint.clone()),
    };
    let template = crate::workspace_dir().join("cfn/template.yaml");
    let built = image_builder::manifest::Built::read(out)?;
    let release = rt.block_on(async {
        let clients = image_builder::publish::Clients::for_target(&target).await?;
        image_builder::publish::publish(&built, &clients, &target, &template).await
    })?;
    rt.block_on(read_back(moto, &release, disk))?;
    let ami = release.amis.get(REGION).context("no AMI in the region")?;
    disks.insert(ami.clone(), disk.to_owned());
    Ok(release)
}

/// Reads the release's snapshot back into `dest` through the EBS direct
/// APIs and checks it is the published disk.
async fn read_back(moto: &Moto, release: &Release, dest: &Path) -> Result<()> {
    let snapshot = &release
        .upload
        .as_ref()
        .context("publish uploaded nothing")?
        .snapshot_id;
    say(&format!(
        "reading {snapshot} back through the EBS direct APIs"
    ));
    let c = image_builder::publish::Clients::new(REGION, Some(&moto.endpoint)).await;
    let sha = image_builder::publish::snapshot::download(&c.ebs, snapshot, dest)
        .await?
        .sha256;
    ensure!(
        sha == release.disk_sha256,
        "the snapshot reads back as sha256 {sha}, the published disk is {}",
        release.disk_sha256
    );
    Ok(())
}

/// What the template's intrinsics name in the stack as created.
async fn names_of_the_stack(
    cfn: &aws_sdk_cloudformation::Client,
    template: &serde_json::Value,
) -> Result<BTreeMap<String, String>> {
    let bucket = physical_id(cfn, "SecretsBucket").await?;
    let cluster = template["Parameters"]["ClusterName"]["Default"]
        .as_str()
        .context("the template's ClusterName has no default")?;
    Ok(crate::iam::stack_names(STACK, cluster, &bucket, REGION))
}

/// The stack's two roles with their policies as moto can enforce them,
/// and a session of each for its instances. Before IAM is enforced.
async fn roles_of_the_stack(
    conf: &aws_config::SdkConfig,
    moto: &Moto,
    template: &serde_json::Value,
) -> Result<BTreeMap<Role, (String, Identity)>> {
    let cfn = aws_sdk_cloudformation::Client::new(conf);
    let names = names_of_the_stack(&cfn, template).await?;
    let mut roles = BTreeMap::new();
    for (role, logical) in [(Role::Master, "MasterRole"), (Role::Node, "NodeRole")] {
        let name = physical_id(&cfn, logical).await?;
        moto.put_role_policies(
            &name,
            &crate::iam::moto_policies(template, logical, &names)?,
        )?;
        let session = moto.assume_role(&name, logical)?;
        roles.insert(role, (name, session));
    }
    Ok(roles)
}

/// Tags the stack's `logical` resource (an EC2 one) with the tags the
/// template gives it: moto's CloudFormation drops a volume's tags, and the
/// master finds its volume by them (a stand-in for CloudFormation's part).
async fn tag_as_the_template_does(
    conf: &aws_config::SdkConfig,
    template: &serde_json::Value,
    logical: &str,
) -> Result<()> {
    let cfn = aws_sdk_cloudformation::Client::new(conf);
    let id = physical_id(&cfn, logical).await?;
    let names = names_of_the_stack(&cfn, template).await?;
    let mut tags = Vec::new();
    for tag in template["Resources"][logical]["Properties"]["Tags"]
        .as_array()
        .with_context(|| format!("{logical} has no Tags"))?
    {
        let key = tag["Key"].as_str().context("a tag without a Key")?;
        let value = crate::iam::resolve(&tag["Value"], &names)?;
        let value = value
            .as_str()
            .with_context(|| format!("{logical}'s tag {key} is not a string"))?;
        tags.push(
            aws_sdk_ec2::types::Tag::builder()
                .key(key)
                .value(value)
                .build(),
        );
    }
    aws_sdk_ec2::Client::new(conf)
        .create_tags()
        .resources(&id)
        .set_tags(Some(tags))
        .send()
        .await?;
    Ok(())
}

async fn create_stack(
    conf: &aws_config::SdkConfig,
    body: &str,
    nodes: usize,
) -> Result<BTreeMap<String, String>> {
    use aws_sdk_cloudformation::types::{Capability, Parameter};
    let cfn = aws_sdk_cloudformation::Client::new(conf);
    let param = |k: &str, v: &str| {
        Parameter::builder()
            .parameter_key(k)
            .parameter_value(v)
            .build()
    };
    cfn.create_stack()
        .stack_name(STACK)
        .template_body(body)
        .parameters(param("AdminCidr", "127.0.0.1/32"))
        .parameters(param("NodeCount", &nodes.to_string()))
        // Backups at the default pace (every 15 minutes): each stalls a
        // loaded master under TCG for a minute or more, and the test takes
        // the one it restores with the admin command.
        // A release update replaces one node at a time, keeping the rest.
        .parameters(param(
            "NodeUpdateMinInService",
            &nodes.saturating_sub(1).to_string(),
        ))
        .capabilities(Capability::CapabilityIam)
        .send()
        .await?;
    let stack = settled(&cfn, "CREATE_COMPLETE").await?;
    Ok(stack
        .outputs()
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
        .collect())
}

/// Waits (two minutes at most) for the stack to leave its `_IN_PROGRESS`
/// state; anything but `done` is an error.
async fn settled(
    cfn: &aws_sdk_cloudformation::Client,
    done: &str,
) -> Result<aws_sdk_cloudformation::types::Stack> {
    let start = Instant::now();
    loop {
        let d = cfn.describe_stacks().stack_name(STACK).send().await?;
        let stack = d.stacks().first().context("no stack")?.clone();
        let status = stack.stack_status().map(|s| s.as_str()).unwrap_or("");
        if status == done {
            return Ok(stack);
        }
        if !status.ends_with("IN_PROGRESS") || start.elapsed() > Duration::from_secs(120) {
            bail!("stack {STACK}: {status} {:?}", stack.stack_status_reason());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_stretches_waits_on_a_slow_run_only_and_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(pace(s(150), s(300)), 1.0, "a fast run keeps the waits");
        assert!((pace(s(649), s(300)) - 2.163).abs() < 0.01);
        assert_eq!(
            pace(s(3000), s(300)),
            MAX_PACE,
            "a hung run is not waited for forever"
        );
        assert_eq!(pace(s(10), Duration::ZERO), MAX_PACE);
    }
}
