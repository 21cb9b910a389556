//! A restore from an etcd backup with the real programs, on the host: a
//! real etcd (the fixtures', on loopback) takes writes and `etcdctl
//! snapshot save` saves them; the snapshot is stored as the master's
//! backups are (in moto's bucket, its sha256 beside it); `restore::fill`
//! fetches it and runs etcdutl, taken out of an image layer as a master
//! takes it out of etcd's image (the layer is made here from the fixtures'
//! etcdutl: a stand-in for the image's own layer, which the VM tests
//! carry); then a real etcd started on the filled directory serves every
//! key, at a revision past the restore's bump.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use anyhow::{ensure, Context as _, Result};
use sha2::{Digest, Sha256};
use slipway_init::aws::Clients;
use slipway_init::config::StackConfig;
use slipway_init::steps::{backup, restore, Context, Deadlines, Instance, Master, Paths, System};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use vm_tests::moto::Moto;
use vm_tests::{fixtures_bin, free_port};

const KEYS: usize = 25;
const BUCKET: &str = "slipway-test-secrets";

/// An etcd on loopback over plain HTTP, killed when dropped.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Etcd {
    fn start(data_dir: &Path, name: &str) -> Result<Self> {
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(fixtures_bin("etcd"));
        let child = vm_tests::die_with_parent(&mut cmd)
            .args(["--name", name, "--data-dir"])
            .arg(data_dir)
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{name}={peer_url}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the fixtures' etcd (`just fixtures` builds it)")?;
        let etcd = Self { child, endpoint };
        let start = Instant::now();
        while etcd.ctl(&["endpoint", "health"]).is_err() {
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "etcd did not answer on {} within 60 s",
                etcd.endpoint
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(etcd)
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(fixtures_bin("etcdctl"))
            .args(["--endpoints", &self.endpoint])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    fn revision(&self) -> Result<u64> {
        let status: serde_json::Value =
            serde_json::from_str(&self.ctl(&["endpoint", "status", "--write-out=json"])?)?;
        status[0]["Status"]["header"]["revision"]
            .as_u64()
            .context("endpoint status gave no revision")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_etcd_snapshot_is_restored_by_etcdutl_and_served_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let moto = Moto::start()?;
    let aws = Clients::new(Some("us-east-1"), Some(&moto.endpoint)).await;
    aws.s3.create_bucket().bucket(BUCKET).send().await?;

    // The cluster as it was: keys written, a snapshot saved.
    let snapshot = dir.path().join("snapshot.db");
    let revision = {
        let etcd = Etcd::start(&dir.path().join("original"), "original")?;
        for i in 0..KEYS {
            etcd.ctl(&["put", &format!("/registry/k{i:02}"), &format!("v{i}")])?;
        }
        etcd.ctl(&["snapshot", "save", &snapshot.to_string_lossy()])?;
        etcd.revision()?
    };
    let bytes = std::fs::read(&snapshot)?;
    let key = backup::key("demo", time::OffsetDateTime::now_utc(), revision);
    aws.s3
        .put_object()
        .bucket(BUCKET)
        .key(&key)
        .metadata("sha256", hex::encode(Sha256::digest(&bytes)))
        .body(bytes.into())
        .send()
        .await?;

    // The master's fill, with the real etcdutl.
    let config = format!(
        "role = \"master\"\ncluster_name = \"demo\"\nsecrets_bucket = \"{BUCKET}\"\n\
         api_name = \"api.demo.slipway.internal\"\npod_cidr = \"10.244.0.0/16\"\n\
         service_cidr = \"10.96.0.0/12\"\n\
         master_eip_allocation = \"eipalloc-0123456789abcdef0\"\n\
         master_dns_zone = \"Z0123456789\"\n\
         master_addresses = {{ \"us-east-1b\" = \"10.0.1.10\" }}\n"
    );
    let ctx = Context {
        config: StackConfig::parse(config.as_bytes())?,
        instance: Instance {
            id: "i-0123456789abcdef0".into(),
            availability_zone: "us-east-1b".into(),
        },
        aws,
        paths: Paths {
            images: vm_tests::images::list_with_file(
                &dir.path().join("images"),
                "registry.k8s.io/etcd:3.6.13-0",
                "/usr/local/bin/etcdutl",
                &std::fs::read(fixtures_bin("etcdutl"))?,
            )?,
            ..Paths::under(dir.path())
        },
        runner: Box::new(System),
        deadlines: Deadlines::default(),
    };
    let mount = dir.path().join("volume");
    std::fs::create_dir_all(&mount)?;
    let said = restore::fill(&Master::of(&ctx)?, &mount, &key)
        .await?
        .context("nothing was filled")?;
    println!("{said}");

    // etcd on the filled directory, as the master's static pod starts it
    // (here on loopback: the member's advertised peer URL is only a name
    // in a one-member cluster).
    let etcd = Etcd::start(&mount.join(restore::ETCD_DATA_DIR), "ip-10-0-1-10")?;
    let listed = etcd.ctl(&["get", "--prefix", "/registry/", "--keys-only"])?;
    let keys: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
    ensure!(
        keys.len() == KEYS,
        "{} of {KEYS} keys back: {keys:?}",
        keys.len()
    );
    ensure!(
        etcd.ctl(&["get", "/registry/k07", "--print-value-only"])?
            .trim()
            == "v7",
        "a value came back changed"
    );
    let now = etcd.revision()?;
    ensure!(
        now > 1_000_000_000 + revision - 1,
        "revision {now}: the restore's bump (past {revision}) is missing"
    );
    Ok(())
}
