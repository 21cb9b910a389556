//! Boot steps against a real moto server: PKI generation and sharing
//! through the secrets bucket (including two masters racing), the Elastic
//! IP, the source/destination check, and a node waiting for its bundle.
//! Every assertion reads back through the AWS API.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use slipway_init::aws::Clients;
use slipway_init::config::StackConfig;
use slipway_init::steps::{self, secrets, Context, Instance, Paths};
use std::time::Duration;
use vm_tests::moto::Moto;

const REGION: &str = "us-east-1";

struct World {
    _moto: Moto,
    aws: Clients,
    alloc: String,
    instances: Vec<Instance>,
    bucket: String,
}

async fn world(instances: usize) -> World {
    let moto = Moto::start().expect("moto");
    let aws = Clients::new(Some(REGION), Some(&moto.endpoint)).await;
    let image = aws
        .ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("images");
    let ami = image.images()[0].image_id().expect("ami").to_owned();
    let run = aws
        .ec2
        .run_instances()
        .image_id(ami)
        .min_count(instances as i32)
        .max_count(instances as i32)
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
    let bucket = "slipway-test-secrets".to_owned();
    aws.s3
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("bucket");
    World {
        _moto: moto,
        aws,
        alloc,
        instances,
        bucket,
    }
}

fn config(w: &World, role: &str) -> StackConfig {
    let master = if role == "master" {
        format!(
            "master_eip_allocation = \"{}\"\nmaster_volume = \"vol-0123456789abcdef0\"\n",
            w.alloc
        )
    } else {
        String::new()
    };
    let text = format!(
        "role = \"{role}\"\ncluster_name = \"demo\"\nsecrets_bucket = \"{}\"\nmaster_ip = \"10.0.1.10\"\npod_cidr = \"10.244.0.0/16\"\nservice_cidr = \"10.96.0.0/12\"\n{master}",
        w.bucket
    );
    StackConfig::parse(text.as_bytes()).expect("config")
}

fn context(w: &World, role: &str, instance: usize, secrets: &std::path::Path) -> Context {
    Context {
        config: config(w, role),
        instance: w.instances[instance].clone(),
        aws: w.aws.clone(),
        paths: Paths {
            secrets: secrets.to_owned(),
        },
    }
}

async fn object(w: &World, key: &str) -> Option<Vec<u8>> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_master_generates_and_a_second_boot_downloads_the_same_ca() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, &dir.path().join("srv/kubernetes"));
    let (first, bundle) = secrets::master(&ctx, None).await.unwrap();
    assert!(first.changed, "{first:?}");
    assert!(first.detail.starts_with("generated"));
    let stored = object(&w, &secrets::pki_key("demo"))
        .await
        .expect("pki.json in the bucket");
    assert!(String::from_utf8_lossy(&stored).contains("BEGIN PRIVATE KEY"));
    assert!(object(&w, &secrets::node_key("demo")).await.is_some());
    let admin = object(&w, &secrets::admin_key("demo"))
        .await
        .expect("admin.conf");
    assert!(String::from_utf8_lossy(&admin).contains("server: https://10.0.1.10:6443"));
    assert!(dir
        .path()
        .join("srv/kubernetes/pki/etcd/server.key")
        .exists());

    // The next boot (a reboot or a replacement) must not regenerate.
    let again = tempfile::tempdir().unwrap();
    let ctx2 = context(&w, "master", 0, &again.path().join("srv/kubernetes"));
    let (second, bundle2) = secrets::master(&ctx2, None).await.unwrap();
    assert!(!second.changed, "{second:?}");
    assert_eq!(
        bundle.ca_fingerprint().unwrap(),
        bundle2.ca_fingerprint().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_masters_end_up_with_one_ca() {
    let w = world(2).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca = context(&w, "master", 0, a.path());
    let cb = context(&w, "master", 1, b.path());
    let (ra, rb) = tokio::join!(secrets::master(&ca, None), secrets::master(&cb, None));
    let (ra, ba) = ra.unwrap();
    let (rb, bb) = rb.unwrap();
    assert_eq!(ba.ca_fingerprint().unwrap(), bb.ca_fingerprint().unwrap());
    // Exactly one of them created it.
    assert_eq!(
        u8::from(ra.changed) + u8::from(rb.changed),
        1,
        "{ra:?} / {rb:?}"
    );
    let stored: slipway_init::pki::Bundle =
        serde_json::from_slice(&object(&w, &secrets::pki_key("demo")).await.unwrap()).unwrap();
    assert_eq!(
        stored.ca_fingerprint().unwrap(),
        ba.ca_fingerprint().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elastic_ip_and_source_dest_check_are_set_and_idempotent() {
    let w = world(2).await;
    let dir = tempfile::tempdir().unwrap();
    let old = context(&w, "master", 0, dir.path());
    let new = context(&w, "master", 1, dir.path());

    let (r, ip) = steps::eip::run(&old).await.unwrap();
    assert!(r.changed);
    let addr = w
        .aws
        .ec2
        .describe_addresses()
        .allocation_ids(&w.alloc)
        .send()
        .await
        .unwrap();
    assert_eq!(
        addr.addresses()[0].instance_id(),
        Some(old.instance.id.as_str())
    );
    assert_eq!(
        addr.addresses()[0].public_ip(),
        Some(ip.to_string().as_str())
    );
    let (r, _) = steps::eip::run(&old).await.unwrap();
    assert!(!r.changed, "{r:?}");

    // A replacement master takes the address over.
    let (r, _) = steps::eip::run(&new).await.unwrap();
    assert!(r.changed && r.detail.contains(&old.instance.id), "{r:?}");
    let addr = w
        .aws
        .ec2
        .describe_addresses()
        .allocation_ids(&w.alloc)
        .send()
        .await
        .unwrap();
    assert_eq!(
        addr.addresses()[0].instance_id(),
        Some(new.instance.id.as_str())
    );

    let r = steps::srcdest::run(&new).await.unwrap();
    assert!(r.changed);
    let attr = w
        .aws
        .ec2
        .describe_instance_attribute()
        .instance_id(&new.instance.id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::SourceDestCheck)
        .send()
        .await
        .unwrap();
    assert_eq!(
        attr.source_dest_check().and_then(|v| v.value()),
        Some(false)
    );
    assert!(!steps::srcdest::run(&new).await.unwrap().changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_for_its_bundle_then_downloads_it() {
    let w = world(2).await;
    let (m, n) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let master = context(&w, "master", 0, m.path());
    let node = context(&w, "node", 1, n.path());
    let waiting = secrets::node(&node, Duration::from_secs(60));
    let late_master = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        secrets::master(&master, None).await
    };
    let (node_result, master_result) = tokio::join!(waiting, late_master);
    let (_, master_bundle) = master_result.unwrap();
    let (report, node_bundle) = node_result.unwrap();
    assert!(report.detail.contains("fetched the node bundle"));
    assert_eq!(
        node_bundle.ca_fingerprint().unwrap(),
        master_bundle.ca_fingerprint().unwrap()
    );
    // A node gets the CA certificate and its bootstrap credentials, no keys.
    assert!(n.path().join("pki/bootstrap-kubelet.conf").exists());
    assert!(!n.path().join("pki/ca.key").exists());
    assert!(node_bundle.get("ca.key").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_bucket_never_fills_fails_at_its_deadline() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let node = context(&w, "node", 0, dir.path());
    let err = secrets::node(&node, Duration::from_secs(3))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("waiting for s3://slipway-test-secrets/demo/node.json"),
        "{err}"
    );
    assert!(err.contains("still not ready after 3s"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_path_writes_secrets_only_below_the_tmpfs() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::create_dir_all(root.path().join("var/lib")).unwrap();
    let secrets_dir = root.path().join("srv/kubernetes");
    let ctx = context(&w, "master", 0, &secrets_dir);
    let (_, bundle) = secrets::master(&ctx, None).await.unwrap();
    let token = bundle.get("bootstrap-token").unwrap().to_owned();
    let mut secret_files = 0;
    for entry in walkdir(root.path()) {
        let text = String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned();
        if text.contains("PRIVATE KEY") || text.contains(&token) {
            assert!(
                entry.starts_with(&secrets_dir),
                "secret outside the tmpfs: {}",
                entry.display()
            );
            secret_files += 1;
        }
    }
    assert!(
        secret_files > 10,
        "expected the PKI below {}",
        secrets_dir.display()
    );
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
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
