//! Boot steps against a real moto server: PKI generation and sharing
//! through the secrets bucket (including two masters racing), the Elastic
//! IP, the source/destination check, and a node waiting for its bundle.
//! Every assertion reads back through the AWS API.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::*;
use slipway_init::steps::{self, secrets, Paths};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_master_generates_and_a_second_boot_downloads_the_same_ca() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, &dir.path().join("srv/kubernetes"));
    let (first, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
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
    assert!(
        String::from_utf8_lossy(&admin).contains("server: https://api.demo.slipway.internal:6443")
    );
    assert!(dir
        .path()
        .join("srv/kubernetes/pki/etcd/server.key")
        .exists());

    // The next boot (a reboot or a replacement) must not regenerate.
    let again = tempfile::tempdir().unwrap();
    let ctx2 = context(&w, "master", 0, &again.path().join("srv/kubernetes"));
    let (second, bundle2) = secrets::master(&common::as_master(&ctx2), None)
        .await
        .unwrap();
    assert!(!second.changed, "{second:?}");
    assert_eq!(
        bundle.ca_fingerprint().unwrap(),
        bundle2.ca_fingerprint().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_racing_masters_end_up_with_one_ca() {
    let w = world(2).await;
    let [(ra, ba, _), (rb, bb, _)] = two_masters_at_once(&w).await;
    assert_eq!(ba.ca_fingerprint().unwrap(), bb.ca_fingerprint().unwrap());
    // Exactly one of them created it.
    assert_eq!(
        u8::from(ra.changed) + u8::from(rb.changed),
        1,
        "{ra:?} / {rb:?}"
    );
    let stored = stored_bundle(&w).await;
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

    let (r, ip) = steps::eip::run(&common::as_master(&old)).await.unwrap();
    assert!(r.changed && !r.detail.contains("taken over"), "{r:?}");
    let (holder, public_ip) = eip_holder(&w).await;
    assert_eq!(holder.as_deref(), Some(old.instance.id.as_str()));
    assert_eq!(public_ip, ip.to_string());
    let (r, _) = steps::eip::run(&common::as_master(&old)).await.unwrap();
    assert!(!r.changed, "{r:?}");

    // A replacement master takes the address over.
    let (r, _) = steps::eip::run(&common::as_master(&new)).await.unwrap();
    assert!(r.changed && r.detail.contains(&old.instance.id), "{r:?}");
    assert_eq!(
        eip_holder(&w).await.0.as_deref(),
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
        secrets::master(&common::as_master(&master), None).await
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
    let mut ctx = context(&w, "master", 0, &secrets_dir);
    ctx.paths = Paths {
        manifests: manifests_dir(),
        ..Paths::under(root.path())
    };
    let (_, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    // Rendering puts the token into the add-ons and a key into the
    // kubelet's kubeconfig: both must stay on the tmpfs too.
    steps::configure::run(&ctx, &bundle).unwrap();
    assert!(root
        .path()
        .join("etc/kubernetes/manifests/etcd.yaml")
        .exists());
    // The controller manager's and the scheduler's serving pairs are made
    // on the tmpfs, once per boot: a second run keeps them.
    let pair = |stem: &str| {
        let read =
            |ext: &str| std::fs::read(secrets_dir.join(format!("pki/{stem}.{ext}"))).unwrap();
        (read("crt"), read("key"))
    };
    let made: Vec<_> = slipway_init::pki::LOOPBACK_SERVING
        .iter()
        .map(|(stem, _)| pair(stem))
        .collect();
    steps::configure::run(&ctx, &bundle).unwrap();
    for ((stem, _), before) in slipway_init::pki::LOOPBACK_SERVING.iter().zip(&made) {
        assert_eq!(&pair(stem), before, "{stem} made again within the boot");
    }
    let token = bundle.get("bootstrap-token").unwrap().to_owned();
    let token_secret = token.split_once('.').unwrap().1.to_owned();
    let mut secret_files = 0;
    for entry in walkdir(root.path()) {
        let text = String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned();
        if text.contains("PRIVATE KEY")
            || text.contains("client-key-data")
            || text.contains(&token_secret)
        {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_volume_is_attached_formatted_once_and_taken_over() {
    let mut w = world(2).await;
    w.volume = data_volume(&w).await;
    let sys = tempfile::tempdir().unwrap();
    let (nvme, dev, proc) = (
        sys.path().join("nvme"),
        sys.path().join("dev"),
        sys.path().join("proc"),
    );
    for d in [&nvme, &dev, &proc] {
        std::fs::create_dir_all(d).unwrap();
    }
    let device = dev.join("nvme1n1");
    std::fs::File::create(&device)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mount_point = sys.path().join("var/lib/etcd");
    let make = |instance: usize| {
        let mut ctx = context(&w, "master", instance, &sys.path().join("secrets"));
        ctx.paths.nvme_class = nvme.clone();
        ctx.paths.dev = dev.clone();
        ctx.paths.proc = proc.clone();
        ctx.runner = Box::new(FileDevices::default());
        ctx.deadlines.set("holder-stops=2").unwrap();
        ctx
    };

    // The device appears only once EC2 has attached the volume.
    let (ec2, volume, serial_dir) = (w.aws.ec2.clone(), w.volume.clone(), nvme.join("nvme1"));
    let appear = tokio::spawn(async move {
        loop {
            let v = ec2
                .describe_volumes()
                .volume_ids(&volume)
                .send()
                .await
                .unwrap();
            if !v.volumes()[0].attachments().is_empty() {
                std::fs::create_dir_all(&serial_dir).unwrap();
                std::fs::write(serial_dir.join("serial"), volume.replace('-', "")).unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let first = make(0);
    let report = steps::volume::run(&common::as_master(&first), &mount_point)
        .await
        .unwrap();
    appear.await.unwrap();
    assert!(
        report.detail.contains("attached") && report.detail.contains("formatted"),
        "{report:?}"
    );
    assert_eq!(
        volume_holder(&w).await.as_deref(),
        Some(w.instances[0].id.as_str())
    );
    assert_eq!(
        steps::volume::probe(&std::fs::read(&device).unwrap()),
        steps::volume::Contents::Ext4
    );
    let uuid = ext4_uuid(&device);

    // A reboot: nothing to attach, nothing to format.
    let report = steps::volume::run(&common::as_master(&make(0)), &mount_point)
        .await
        .unwrap();
    assert!(!report.detail.contains("formatted"), "{report:?}");
    assert_eq!(ext4_uuid(&device), uuid);

    // A second master may not take the volume from a running one: it
    // waits for it to stop, and refuses at the deadline…
    let err = steps::volume::run(&common::as_master(&make(1)), &mount_point)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("still running after 2s"), "{err}");
    // …but takes it over once the old master is gone, keeping its data.
    // (A stopped instance keeps its volumes attached; a terminated one
    // releases them, which is the easy case.)
    w.aws
        .ec2
        .stop_instances()
        .instance_ids(&w.instances[0].id)
        .send()
        .await
        .unwrap();
    let report = steps::volume::run(&common::as_master(&make(1)), &mount_point)
        .await
        .unwrap();
    assert!(
        report
            .detail
            .contains(&format!("taken over from {}", w.instances[0].id)),
        "{report:?}"
    );
    assert!(!report.detail.contains("formatted"), "{report:?}");
    assert_eq!(ext4_uuid(&device), uuid);
    assert_eq!(
        volume_holder(&w).await.as_deref(),
        Some(w.instances[1].id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masters_first_boot_runs_every_step_and_a_reboot_changes_nothing() {
    let mut w = world(1).await;
    w.volume = data_volume(&w).await;
    let stable = stable_ip(&w, 0).await;
    let root = tempfile::tempdir().unwrap();
    let paths = master_root(&w, root.path());

    let runner = FileDevices::default();
    let mut ctx = context(&w, "master", 0, &paths.secrets);
    reserve(&mut ctx, &stable);
    ctx.paths = paths.clone();
    ctx.runner = Box::new(runner.clone());
    let reports = steps::bootstrap(&ctx).await.unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.step).collect();
    assert_eq!(
        names,
        [
            "source-dest-check",
            "data-volume",
            "elastic-ip",
            "private-ip",
            "api-record",
            "secrets",
            "configure"
        ]
    );
    assert!(reports.iter().all(|r| r.changed), "{reports:?}");

    let eni = w
        .aws
        .ec2
        .describe_instances()
        .instance_ids(&w.instances[0].id)
        .send()
        .await
        .unwrap();
    let ips: Vec<String> = eni.reservations()[0].instances()[0].network_interfaces()[0]
        .private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address().map(str::to_owned))
        .collect();
    assert!(ips.contains(&stable), "{stable} not in {ips:?}");
    // The API's name points at the master's address (read from moto's
    // own model: its Route 53 refuses signed GETs while IAM is enforced).
    let records = w.moto.a_records().unwrap();
    assert_eq!(records.get(API_NAME), Some(&stable.parse().unwrap()));
    let commands = runner.commands.lock().unwrap().clone();
    assert!(
        commands
            .iter()
            .any(|c| c == &format!("ip addr add {stable}/32 dev ens5")),
        "{commands:?}"
    );

    // A reboot: every step finds its work done (the mount and the host
    // address live in memory and are redone; the AWS side is untouched).
    let mut again = context(&w, "master", 0, &paths.secrets);
    reserve(&mut again, &stable);
    again.paths = paths;
    again.runner = Box::new(FileDevices::default());
    let reports = steps::bootstrap(&again).await.unwrap();
    for r in &reports {
        // The mount, the host address and the record's UPSERT (a no-op for
        // Route 53) are redone.
        if !["data-volume", "private-ip", "api-record"].contains(&r.step) {
            assert!(!r.changed, "{r:?}");
        }
    }
    assert!(!reports[1].detail.contains("formatted"), "{:?}", reports[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_config_and_identity_from_the_metadata_service() {
    let w = world(1).await;
    publish_node_bundle(&w).await;
    let me = &w.instances[0];
    let imds =
        vm_tests::imds::Imds::instance(&me.id, &me.availability_zone, &config_text(&w, "node"))
            .unwrap();
    imds.unavailable_for(2);
    let root = tempfile::tempdir().unwrap();
    let out = boot_command(&imds.endpoint, &w.moto.endpoint, root.path(), &w.node)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("SLIPWAY-INIT-DONE"), "{stdout}");
    assert!(
        stderr.contains("waiting for the instance metadata service"),
        "{stderr}"
    );
    // The journal never carries the token's secret (nor any key).
    let node: slipway_init::pki::Bundle =
        serde_json::from_slice(&object(&w, &secrets::node_key("demo")).await.unwrap()).unwrap();
    let token = node.get("bootstrap-kubelet.conf").unwrap();
    let secret = token
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .and_then(|t| t.split_once('.'))
        .map(|(_, s)| s.to_owned())
        .unwrap();
    assert!(
        !stdout.contains(&secret) && !stderr.contains(&secret),
        "the token's secret is in the output"
    );
    assert!(!stdout.contains("PRIVATE KEY") && !stderr.contains("PRIVATE KEY"));
    // The identity came from the metadata service: the kubelet is named after it.
    let env = std::fs::read_to_string(root.path().join("etc/kubernetes/kubelet.env")).unwrap();
    assert!(
        env.contains(&format!("--hostname-override={}", me.id)),
        "{env}"
    );
    assert!(root
        .path()
        .join("srv/kubernetes/pki/bootstrap-kubelet.conf")
        .exists());
    assert!(!root.path().join("srv/kubernetes/pki/ca.key").exists());
    assert!(!root.path().join("etc/kubernetes/manifests").exists());
    // No API server admitted the node: the boot went on past the wait's
    // deadline, for the kubelet to ask on its own.
    assert!(
        stderr.contains("the API server does not answer") && stderr.contains(NO_API_SERVER),
        "{stderr}"
    );
    assert!(stderr.contains("not admitted after"), "{stderr}");
}

#[test]
fn the_binary_rejects_a_bad_config_by_name_and_exit_code() {
    let node = "role = \"node\"\ncluster_name = \"demo\"\nsecrets_bucket = \"b-1\"\napi_name = \"api.demo.slipway.internal\"\nservice_cidr = \"10.96.0.0/12\"\n";
    for (config, key) in [
        // A bad value.
        (format!("{node}pod_cidr = \"10.244.0.0/33\"\n"), "pod_cidr"),
        // User data that names an AWS endpoint (someone who may write it,
        // but should not receive the instance's credentials).
        (
            format!("{node}pod_cidr = \"10.244.0.0/16\"\naws_endpoint = \"http://127.0.0.1:9\"\n"),
            "aws_endpoint",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_slipway-init"))
            .args(["--no-boot-check", "--config"])
            .arg(&path)
            .arg("--root")
            .arg(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A bad config is final: no attempt can change it, so systemd must not retry.
        assert_eq!(out.status.code(), Some(2), "{stdout}");
        assert!(
            stdout.contains(&format!("SLIPWAY-INIT-FAILED stack config: `{key}`")),
            "{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apis_name_follows_the_master_across_zones_and_goes_only_with_the_stack() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut ctx = context(&w, "master", 0, dir.path());
    for (zone, ip) in [("us-east-1a", "10.0.1.10"), ("us-east-1b", "10.0.2.10")] {
        ctx.instance.availability_zone = zone.into();
        let report = steps::api_record::run(&common::as_master(&ctx))
            .await
            .unwrap();
        assert!(report.detail.contains(ip), "{report:?}");
        let records = w.moto.a_records().unwrap();
        assert_eq!(records.get(API_NAME), Some(&ip.parse().unwrap()), "{zone}");
    }
    // A zone the stack reserves no address in is refused by name, before
    // any master's step runs.
    ctx.instance.availability_zone = "us-east-1c".into();
    let err = steps::Master::of(&ctx).unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("us-east-1c"),
        "{err}"
    );
    // So is the work both roles do: the master's Node name, its configure.
    let err = steps::leave::own_node(&ctx).unwrap_err();
    assert!(err.to_string().contains("us-east-1c"), "{err}");
    ctx.instance.availability_zone = "us-east-1b".into();

    // A departure while the stack stands keeps the record for the next
    // master (the master asks CloudFormation, as its role allows). moto
    // misreads CreateStack's signature, so that call goes unenforced (and
    // may answer a retry with AlreadyExists: the master's DescribeStacks
    // below fails if there is no stack).
    w.moto.relax_iam(100).unwrap();
    let _ = w
        .aws
        .cfn
        .create_stack()
        .stack_name("slipway")
        .template_body(
            r#"{"Resources": {"P": {"Type": "AWS::SSM::Parameter", "Properties": {"Type": "String", "Value": "x"}}}}"#,
        )
        .send()
        .await;
    w.moto.enforce_iam().unwrap();
    ctx.config.signal = Some(slipway_init::config::Signal {
        stack: "slipway".into(),
        resource: "MasterGroup".into(),
    });
    let said = steps::api_record::leave(&common::as_master(&ctx))
        .await
        .unwrap();
    assert!(said.contains("kept"), "{said}");
    assert!(w.moto.a_records().unwrap().contains_key(API_NAME));
    // With the stack going, the record goes with the values it was set to
    // (moto, like Route 53, deletes a record only given them).
    steps::api_record::delete(&common::as_master(&ctx))
        .await
        .unwrap();
    assert!(!w.moto.a_records().unwrap().contains_key(API_NAME));
}
