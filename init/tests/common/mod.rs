//! What the moto-level tests share: a moto with instances, an Elastic IP
//! and a bucket, and IAM enforced (`vm_tests::iam`): each step runs as the
//! role the template gives its member (as moto can enforce it: action
//! names and S3 ARNs, no conditions, other resources widened to `*`), the
//! test's own setup and checks as an administrator; stack configs and step
//! contexts for them; a runner that makes filesystems on plain files and
//! records what would touch the host.

#![allow(dead_code, clippy::unwrap_used)] // test glue, each test binary uses a part

use slipway_init::aws::{CallPolicy, Clients};
use slipway_init::config::{MasterConfig, Member, StackConfig};
use slipway_init::steps::{Context, Deadlines, Instance, Master, Paths, Runner, StepError, System};
use vm_tests::iam::Identity;
use vm_tests::moto::Moto;

pub const REGION: &str = "us-east-1";
pub const BUCKET: &str = "slipway-test-secrets";

pub struct World {
    pub moto: Moto,
    /// The test's own calls, as an administrator.
    pub aws: Clients,
    pub administrator: Identity,
    /// Sessions of the template's master and node roles, and clients
    /// that sign as them.
    pub master: Identity,
    pub node: Identity,
    master_aws: Clients,
    node_aws: Clients,
    pub alloc: String,
    pub instances: Vec<Instance>,
    pub bucket: String,
    pub volume: String,
    /// The private hosted zone the API's name lives in.
    pub zone: String,
}

/// The stack template in the source tree, as JSON.
pub fn template() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cfn/template.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub async fn world(instances: usize) -> World {
    world_with(instances, &template()).await
}

/// A world whose roles come from `template` (e.g. one with a grant removed).
pub async fn world_with(instances: usize, template: &serde_json::Value) -> World {
    let moto = Moto::start().expect("moto");
    let names = vm_tests::iam::stack_names("slipway", "demo", BUCKET, REGION);
    let mut roles = Vec::new();
    for (logical, role) in [
        ("MasterRole", "slipway-master"),
        ("NodeRole", "slipway-node"),
    ] {
        let policies = vm_tests::iam::moto_policies(template, logical, &names).unwrap();
        moto.create_role(role, &policies).unwrap();
        roles.push(moto.assume_role(role, role).unwrap());
    }
    let (node, master) = (roles.pop().unwrap(), roles.pop().unwrap());
    let administrator = moto.administrator().unwrap();
    moto.enforce_iam().unwrap();
    let aws = clients_as(&administrator, &moto.endpoint).await;
    let master_aws = clients_as(&master, &moto.endpoint).await;
    let node_aws = clients_as(&node, &moto.endpoint).await;
    let ami = ami(&aws).await;
    let run = aws
        .ec2
        .run_instances()
        .image_id(ami)
        .min_count(i32::try_from(instances).unwrap())
        .max_count(i32::try_from(instances).unwrap())
        .send()
        .await
        .expect("run instances");
    let instances = run
        .instances()
        .iter()
        .map(|i| Instance {
            id: i.instance_id().expect("id").to_owned(),
            availability_zone: i
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or("")
                .to_owned(),
        })
        .collect();
    let alloc = aws
        .ec2
        .allocate_address()
        .domain(aws_sdk_ec2::types::DomainType::Vpc)
        .send()
        .await
        .expect("eip")
        .allocation_id()
        .expect("allocation")
        .to_owned();
    let bucket = BUCKET.to_owned();
    aws.s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("bucket");
    let zone = aws
        .route53
        .create_hosted_zone()
        .name("demo.slipway.internal")
        .caller_reference("demo")
        .send()
        .await
        .expect("hosted zone")
        .hosted_zone()
        .expect("zone")
        .id()
        .trim_start_matches("/hostedzone/")
        .to_owned();
    World {
        moto,
        aws,
        administrator,
        master,
        node,
        master_aws,
        node_aws,
        alloc,
        instances,
        bucket,
        volume: "vol-0123456789abcdef0".into(),
        zone,
    }
}

/// The image moto launches instances from.
pub async fn ami(aws: &Clients) -> String {
    let images = aws
        .ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("images");
    images.images()[0].image_id().expect("ami").to_owned()
}

/// The API's name in the tests' stack config.
pub const API_NAME: &str = "api.demo.slipway.internal";

/// Makes `ip` the master's reserved address in `ctx`'s zone.
pub fn reserve(ctx: &mut Context, ip: &str) {
    let zone = ctx.instance.availability_zone.clone();
    settings(&mut ctx.config)
        .addresses
        .insert(zone, ip.parse().unwrap());
}

/// A master's view of `ctx`, which the test made a master's.
pub fn as_master(ctx: &Context) -> Master<'_> {
    Master::of(ctx).expect("a master's context")
}

/// The master's settings in a master's config, to change.
pub fn settings(config: &mut StackConfig) -> &mut MasterConfig {
    match &mut config.member {
        Member::Master(m) => m,
        Member::Node => panic!("a node's config"),
    }
}

pub fn config(w: &World, role: &str) -> StackConfig {
    StackConfig::parse(config_text(w, role).as_bytes()).expect("config")
}

pub fn config_text(w: &World, role: &str) -> String {
    let master = if role == "master" {
        format!(
            "master_eip_allocation = \"{}\"\nmaster_dns_zone = \"{}\"\nmaster_addresses = {{ \"{REGION}a\" = \"10.0.1.10\", \"{REGION}b\" = \"10.0.2.10\" }}\n",
            w.alloc, w.zone
        )
    } else {
        String::new()
    };
    format!(
        "role = \"{role}\"\ncluster_name = \"demo\"\nsecrets_bucket = \"{}\"\napi_name = \"{API_NAME}\"\npod_cidr = \"10.244.0.0/16\"\nservice_cidr = \"10.96.0.0/12\"\nregion = \"{REGION}\"\n{master}",
        w.bucket
    )
}

/// The templates in the source tree (the image carries the same files).
pub fn manifests_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Clients that sign as `who` and reach AWS at `endpoint` (moto, or a
/// fault proxy in front of it).
pub async fn clients_as(who: &Identity, endpoint: &str) -> Clients {
    Clients::with_credentials(
        Some(REGION),
        Some(endpoint),
        CallPolicy::default(),
        Some(who.credentials()),
    )
    .await
}

impl World {
    /// The session of `role`'s instance role ("master" or "node").
    pub fn role(&self, role: &str) -> &Identity {
        match role {
            "master" => &self.master,
            _ => &self.node,
        }
    }

    /// Clients that sign as `role`'s session.
    pub fn clients(&self, role: &str) -> Clients {
        match role {
            "master" => self.master_aws.clone(),
            _ => self.node_aws.clone(),
        }
    }

    /// An SDK config for the test's own calls to services `Clients` lacks.
    pub async fn administrator_config(&self) -> aws_config::SdkConfig {
        slipway_init::sdk::config_loader()
            .region(aws_config::Region::new(REGION))
            .endpoint_url(&self.moto.endpoint)
            .credentials_provider(self.administrator.credentials())
            .load()
            .await
    }
}

/// A step context for instance `instance` playing `role`: its calls are
/// made as that role's session.
pub fn context(w: &World, role: &str, instance: usize, secrets: &std::path::Path) -> Context {
    Context {
        config: config(w, role),
        instance: w.instances[instance].clone(),
        aws: w.clients(role),
        paths: Paths {
            secrets: secrets.to_owned(),
            ..Paths::default()
        },
        runner: Box::new(System),
        deadlines: Deadlines::default(),
    }
}

/// A master's secrets step run by instances 0 and 1 at once, each with
/// its tmpfs below a directory of its own: each one's report, bundle and
/// directory.
pub async fn two_masters_at_once(
    w: &World,
) -> [(
    slipway_init::steps::Report,
    slipway_init::pki::Bundle,
    tempfile::TempDir,
); 2] {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ca, cb) = (
        context(w, "master", 0, a.path()),
        context(w, "master", 1, b.path()),
    );
    let (ma, mb) = (as_master(&ca), as_master(&cb));
    let (ra, rb) = tokio::join!(
        slipway_init::steps::secrets::master(&ma, None),
        slipway_init::steps::secrets::master(&mb, None)
    );
    let ((ra, ba), (rb, bb)) = (ra.unwrap(), rb.unwrap());
    [(ra, ba, a), (rb, bb, b)]
}

/// The cluster's PKI bundle as the bucket holds it.
pub async fn stored_bundle(w: &World) -> slipway_init::pki::Bundle {
    let bytes = object(w, &slipway_init::steps::secrets::pki_key("demo"))
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

pub async fn object(w: &World, key: &str) -> Option<Vec<u8>> {
    let out = w
        .aws
        .s3
        .get_object()
        .bucket(&w.bucket)
        .key(key)
        .send()
        .await
        .ok()?;
    Some(out.body.collect().await.ok()?.into_bytes().to_vec())
}
pub fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Runs mkfs for real (on a file standing in for the device); records
/// what would change the host (mount, ip) instead of running it.
#[derive(Debug, Default, Clone)]
pub struct FileDevices {
    pub commands: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Runner for FileDevices {
    fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&std::path::Path>,
    ) -> Result<String, StepError> {
        if program == "mkfs.ext4" {
            return System.run_with_input(program, args, input);
        }
        self.commands
            .lock()
            .unwrap()
            .push(format!("{program} {}", args.join(" ")));
        Ok(String::new())
    }
}

/// Which instance holds the Elastic IP, and its public address, as EC2 says.
pub async fn eip_holder(w: &World) -> (Option<String>, String) {
    let out = w
        .aws
        .ec2
        .describe_addresses()
        .allocation_ids(&w.alloc)
        .send()
        .await
        .unwrap();
    let a = &out.addresses()[0];
    (
        a.instance_id().map(str::to_owned),
        a.public_ip().unwrap_or("").to_owned(),
    )
}

/// Which instance the data volume is attached to, as EC2 says.
pub async fn volume_holder(w: &World) -> Option<String> {
    let out = w
        .aws
        .ec2
        .describe_volumes()
        .volume_ids(&w.volume)
        .send()
        .await
        .unwrap();
    out.volumes()[0]
        .attachments()
        .first()
        .and_then(|a| a.instance_id())
        .map(str::to_owned)
}

/// A fresh volume in the first instance's availability zone, tagged as
/// the template tags the cluster's data volume.
pub async fn data_volume(w: &World) -> String {
    data_volume_in(w, &w.instances[0].availability_zone).await
}

/// The cluster's data volume, tagged as the template tags it, in `zone`.
pub async fn data_volume_in(w: &World, zone: &str) -> String {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let tag = |k: &str| Tag::builder().key(k).value("demo").build();
    let created = w
        .aws
        .ec2
        .create_volume()
        .availability_zone(zone)
        .size(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                .tags(tag("slipway:cluster"))
                .tags(tag("slipway:etcd-data"))
                .build(),
        )
        .send()
        .await
        .unwrap();
    created.volume_id().unwrap().to_owned()
}

pub fn ext4_uuid(device: &std::path::Path) -> Vec<u8> {
    std::fs::read(device).unwrap()[1024 + 104..1024 + 120].to_vec()
}

/// The instance's primary private IP, as EC2 reports it.
pub async fn private_ip(w: &World, instance: usize) -> String {
    let described = w
        .aws
        .ec2
        .describe_instances()
        .instance_ids(&w.instances[instance].id)
        .send()
        .await
        .unwrap();
    described.reservations()[0].instances()[0]
        .private_ip_address()
        .unwrap()
        .to_owned()
}

/// An address in the instance's own /24 that no instance of the world
/// holds, for the master's stable IP: moto gives an instance launched
/// without a subnet a random address, so a fixed last octet was now and
/// then the master's own and the step had nothing to assign.
pub async fn stable_ip(w: &World, instance: usize) -> String {
    let mut taken = Vec::new();
    for i in 0..w.instances.len() {
        taken.push(private_ip(w, i).await);
    }
    let own = &taken[instance];
    let prefix = &own[..=own.rfind('.').unwrap()];
    (200..=250)
        .map(|last| format!("{prefix}{last}"))
        .find(|ip| !taken.contains(ip))
        .unwrap()
}

/// Paths below `root` for a master: the data volume's device is a blank
/// file there from the start (its controller's serial is the volume ID),
/// and the default route is on `ens5`.
pub fn master_root(w: &World, root: &std::path::Path) -> Paths {
    let paths = Paths {
        manifests: manifests_dir(),
        ..Paths::under(root)
    };
    let serial = paths.nvme_class.join("nvme1");
    std::fs::create_dir_all(&serial).unwrap();
    std::fs::write(serial.join("serial"), w.volume.replace('-', "")).unwrap();
    std::fs::create_dir_all(&paths.dev).unwrap();
    std::fs::File::create(paths.dev.join("nvme1n1"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::create_dir_all(paths.proc.join("net")).unwrap();
    std::fs::write(
        paths.proc.join("net/route"),
        "Iface\tDestination\tGateway\nens5\t00000000\t0101000A\n",
    )
    .unwrap();
    paths
}

/// Where the node bundles of these tests say the API server is: port 1 on
/// loopback, where nothing listens.
pub const NO_API_SERVER: &str = "https://127.0.0.1:1";

/// What a first master leaves for nodes: `<cluster>/node.json` from a fresh PKI.
pub async fn publish_node_bundle(w: &World) {
    let pki = slipway_init::pki::Bundle::generate(&slipway_init::pki::Identity::of(
        &config(w, "master"),
        None,
    ))
    .unwrap();
    let mut node = pki.node_bundle().unwrap();
    // No API server: the bootstrap kubeconfig names a loopback port nothing
    // listens on, so a node's admission wait asks nothing beyond this host.
    let conf = node.files.get_mut("bootstrap-kubelet.conf").unwrap();
    let server = "server: https://api.demo.slipway.internal:6443";
    assert!(conf.contains(server), "{conf}");
    *conf = conf.replace(server, &format!("server: {NO_API_SERVER}"));
    let body = serde_json::to_vec(&node).unwrap();
    w.aws
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key(slipway_init::steps::secrets::node_key("demo"))
        .body(body.into())
        .send()
        .await
        .unwrap();
}

/// `slipway-init`'s boot outside the image: identity and config from the
/// metadata service at `imds`, AWS at `aws` (as `who`), every path below
/// `root`, the source tree's templates.
pub fn boot_command(
    imds: &str,
    aws: &str,
    root: &std::path::Path,
    who: &Identity,
) -> std::process::Command {
    let mut boot = std::process::Command::new(env!("CARGO_BIN_EXE_slipway-init"));
    boot.envs(who.env()).args(["--aws-endpoint", aws]);
    // A node's admission wait gives up at once: no API server answers.
    boot.args(["--deadline", "admission=3"]);
    boot.args(["--no-boot-check", "--imds-endpoint", imds, "--root"])
        .arg(root)
        .arg("--manifests")
        .arg(manifests_dir());
    boot
}

/// Puts an etcd backup of cluster `demo` as an administrator would find
/// it: `body` under the key for `taken`, with `sha256` stored beside it.
pub async fn put_backup(
    w: &World,
    taken: time::OffsetDateTime,
    revision: u64,
    body: &[u8],
    sha256: &str,
) -> String {
    let key = slipway_init::steps::backup::key("demo", taken, revision);
    w.aws
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key(&key)
        .metadata("sha256", sha256)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap();
    key
}
