//! The boot under AWS faults, against a real moto behind the fault proxy
//! (`vm_tests::faults`): throttling, 5xx answers and connection resets on
//! every action, a metadata service that starts late, an action that never
//! succeeds (the instance gives up and reports itself unhealthy), and the
//! data volume handed over from a predecessor without force.
//!
//! moto has no `stopping` state (it stops an instance at once): where a
//! test needs a predecessor that stays `stopping`, the proxy reports that
//! state for it in DescribeInstances while moto already has it stopped
//! (`report_instance_state`, a stand-in named in the test).

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::*;
use slipway_init::aws::{CallPolicy, Clients};
use slipway_init::steps::{self, secrets, volume, Context, Paths, Report, StepError};
use std::time::{Duration, Instant};
use vm_tests::faults::{FaultProxy, Kind, Plan};

const FAULTS: [Kind; 3] = [Kind::Throttle, Kind::ServerError, Kind::Reset];

/// Clients that reach moto through `proxy`, signing as `role`'s session.
async fn through(w: &World, role: &str, proxy: &FaultProxy) -> Clients {
    Clients::with_credentials(
        Some(REGION),
        Some(&proxy.endpoint),
        CallPolicy::quick(),
        Some(w.role(role).credentials()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_and_a_node_boot_with_30_percent_of_calls_failing() {
    for seed in [1, 2, 3] {
        let mut w = world(2).await;
        w.volume = data_volume(&w).await;
        let plan = Plan::random(0.3, seed, FAULTS).and_first_of_each();
        let proxy = FaultProxy::start(&w.moto.endpoint, plan).unwrap();

        let stable = stable_ip(&w, 0).await;
        let (mroot, nroot) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mpaths = master_root(&w, mroot.path());
        let mut master = context(&w, "master", 0, &mpaths.secrets);
        reserve(&mut master, &stable);
        master.paths = mpaths;
        master.runner = Box::new(FileDevices::default());
        master.aws = through(&w, "master", &proxy).await;
        let mut node = context(&w, "node", 1, &nroot.path().join("srv/kubernetes"));
        node.paths = Paths {
            manifests: manifests_dir(),
            ..Paths::under(nroot.path())
        };
        node.aws = through(&w, "node", &proxy).await;

        // The node starts first and waits for the master's bundle.
        let (m, n) = tokio::join!(steps::bootstrap(&master), steps::bootstrap(&node));
        let m = m.unwrap_or_else(|e| panic!("seed {seed}: master: {e}\n{}", proxy.summary()));
        let n = n.unwrap_or_else(|e| panic!("seed {seed}: node: {e}\n{}", proxy.summary()));
        assert_eq!(m.len(), 7, "{m:?}");
        assert_eq!(n.len(), 3, "{n:?}");
        assert!(n[1].detail.contains("fetched the node bundle"), "{n:?}");

        // Every action the boot made met a fault and got through.
        let counts = proxy.counts();
        println!("seed {seed}:\n{}", proxy.summary());
        for ((service, action), c) in &counts {
            assert!(c.failed() >= 1, "{service} {action} never failed: {c}");
            assert!(
                c.forwarded >= 1,
                "{service} {action} never got through: {c}"
            );
        }
        for api in [
            ("ec2", "ModifyInstanceAttribute"),
            ("ec2", "AttachVolume"),
            ("ec2", "AssociateAddress"),
            ("ec2", "AssignPrivateIpAddresses"),
            ("s3", "PutObject"),
            ("s3", "GetObject"),
        ] {
            assert!(
                counts.contains_key(&(api.0.to_owned(), api.1.to_owned())),
                "{api:?} not called: {}",
                proxy.summary()
            );
        }
        let total = proxy.total();
        assert!(
            total.throttled > 0 && total.server_errors > 0 && total.resets > 0,
            "{total}"
        );
        // One CA, stored once.
        let stored = object(&w, &secrets::pki_key("demo")).await.unwrap();
        assert!(!stored.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_boots_while_the_metadata_service_is_down_for_a_minute_then_flaky() {
    let w = world(1).await;
    publish_node_bundle(&w).await;
    let proxy = FaultProxy::start(
        &w.moto.endpoint,
        Plan::random(0.3, 11, FAULTS).and_first_of_each(),
    )
    .unwrap();
    let me = &w.instances[0];
    let user_data = config_text(&w, "node");
    let imds = vm_tests::imds::Imds::instance(&me.id, &me.availability_zone, &user_data).unwrap();
    let started = Instant::now();
    imds.unavailable_until(started + Duration::from_secs(60));
    // And once up, it answers a third of requests with 500.
    imds.server_errors(0.3, 5);
    let root = tempfile::tempdir().unwrap();
    let mut boot = boot_command(&imds.endpoint, &proxy.endpoint, root.path(), &w.node);
    let out = tokio::task::spawn_blocking(move || boot.output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\n{}",
        proxy.summary()
    );
    assert!(stdout.contains("SLIPWAY-INIT-DONE"), "{stdout}");
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(
        stderr.contains("waiting for the instance metadata service"),
        "{stderr}"
    );
    for ((service, action), c) in proxy.counts() {
        assert!(
            c.failed() >= 1 && c.forwarded >= 1,
            "{service} {action}: {c}"
        );
    }
    assert!(root
        .path()
        .join("srv/kubernetes/pki/bootstrap-kubelet.conf")
        .exists());
}

/// An Auto Scaling group of one in moto; returns its instance.
async fn group_of_one(w: &World) -> (String, String) {
    let ami = ami(&w.aws).await;
    w.aws
        .ec2
        .create_launch_template()
        .launch_template_name("node")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Medium)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let asg = autoscaling(w).await;
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("demo-node")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_name("node")
                .build(),
        )
        .availability_zones(format!("{REGION}a"))
        .min_size(1)
        .max_size(1)
        .desired_capacity(1)
        .send()
        .await
        .unwrap();
    let health = asg.describe_auto_scaling_instances().send().await.unwrap();
    let i = &health.auto_scaling_instances()[0];
    (
        i.instance_id().unwrap().to_owned(),
        i.availability_zone().unwrap().to_owned(),
    )
}

/// Auto Scaling in moto, for the test's own setup and checks.
async fn autoscaling(w: &World) -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::new(&w.administrator_config().await)
}

/// The instance's health as its Auto Scaling group records it.
async fn health(w: &World, id: &str) -> String {
    let out = autoscaling(w)
        .await
        .describe_auto_scaling_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    out.auto_scaling_instances()[0]
        .health_status()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_that_always_fails_ends_with_the_instance_marked_unhealthy() {
    let w = world(1).await;
    let (id, az) = group_of_one(&w).await;
    let proxy = FaultProxy::start(
        &w.moto.endpoint,
        Plan::always("ec2", "ModifyInstanceAttribute", Kind::Throttle),
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("stack.toml");
    std::fs::write(&config, config_text(&w, "node")).unwrap();
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_slipway-init"))
            .args(["--no-boot-check", "--attempts", "3", "--instance-id", &id])
            .args(["--availability-zone", &az, "--config"])
            .arg(&config)
            .arg("--root")
            .arg(root.path())
            .env("AWS_MAX_ATTEMPTS", "2")
            .env("SLIPWAY_AWS_ENDPOINT", &proxy.endpoint)
            .envs(w.node.env())
            .output()
            .unwrap()
    };
    for attempt in 1..=2 {
        let out = run();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        for part in [
            &format!("step source-dest-check failed (attempt {attempt} of 3)"),
            "ec2:ModifyInstanceAttribute",
            "RequestLimitExceeded",
            "systemd runs the boot again",
        ] {
            assert!(stdout.contains(part), "{part:?} missing from {stdout}");
        }
        assert!(health(&w, &id).await.eq_ignore_ascii_case("healthy"));
    }
    let out = run();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("attempt 3, the last"), "{stdout}");
    assert!(stdout.contains("ec2:ModifyInstanceAttribute"), "{stdout}");
    assert!(
        stderr.contains(&format!("marked {id} unhealthy")),
        "{stderr}"
    );
    assert!(health(&w, &id).await.eq_ignore_ascii_case("unhealthy"));
    // Two SDK attempts per boot attempt, no more.
    assert_eq!(proxy.count("ec2", "ModifyInstanceAttribute").seen, 6);
}

/// Two masters on one scratch root: `old` (straight to moto) has attached
/// and formatted the data volume; `new` reaches moto through the proxy.
async fn hand_over() -> (World, tempfile::TempDir, FaultProxy, Context, Context) {
    let mut w = world(2).await;
    w.volume = data_volume(&w).await;
    let root = tempfile::tempdir().unwrap();
    let paths = master_root(&w, root.path());
    let proxy = FaultProxy::start(&w.moto.endpoint, Plan::passthrough()).unwrap();
    let make = |instance: usize, aws: Clients| {
        let mut ctx = context(&w, "master", instance, &paths.secrets);
        ctx.paths = paths.clone();
        ctx.runner = Box::new(FileDevices::default());
        ctx.aws = aws;
        ctx
    };
    let old = make(0, w.clients("master"));
    let first = volume::run(&common::as_master(&old), &paths.etcd_data)
        .await
        .unwrap();
    assert!(first.detail.contains("formatted"), "{first:?}");
    let new = make(1, through(&w, "master", &proxy).await);
    (w, root, proxy, old, new)
}

/// `new` holds the volume, taken from `old` with exactly one plain detach.
async fn taken_over_without_force(
    w: &World,
    proxy: &FaultProxy,
    old: &Context,
    new: &Context,
    report: &Report,
) {
    assert!(
        report
            .detail
            .contains(&format!("taken over from {}", old.instance.id)),
        "{report:?}"
    );
    assert!(!report.detail.contains("formatted"), "{report:?}");
    assert_eq!(
        volume_holder(w).await.as_deref(),
        Some(new.instance.id.as_str())
    );
    let detaches: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.action == "DetachVolume")
        .collect();
    assert_eq!(detaches.len(), 1, "{detaches:?}");
    assert_ne!(
        detaches[0].params.get("Force").map(String::as_str),
        Some("true")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_waits_for_a_running_predecessor_to_stop_and_takes_the_volume_without_force() {
    let (w, _root, proxy, old, new) = hand_over().await;
    let paths = old.paths.clone();
    let (ec2, old_id) = (w.aws.ec2.clone(), old.instance.id.clone());
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        ec2.stop_instances()
            .instance_ids(old_id)
            .send()
            .await
            .unwrap();
    });
    let started = Instant::now();
    let report = volume::run(&common::as_master(&new), &paths.etcd_data)
        .await
        .unwrap();
    stopper.await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(10));
    taken_over_without_force(&w, &proxy, &old, &new, &report).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_volume_is_refused_while_the_clusters_pki_exists() {
    let mut w = world(1).await;
    w.volume = data_volume(&w).await;
    let root = tempfile::tempdir().unwrap();
    let paths = master_root(&w, root.path());
    let mut ctx = context(&w, "master", 0, &paths.secrets);
    ctx.paths = paths.clone();
    ctx.runner = Box::new(FileDevices::default());
    w.aws
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key(secrets::pki_key("demo"))
        .body(b"{}".to_vec().into())
        .send()
        .await
        .unwrap();
    let err = volume::run(&common::as_master(&ctx), &paths.etcd_data)
        .await
        .unwrap_err();
    assert!(matches!(err, StepError::Refused { .. }), "{err}");
    assert!(err.is_permanent());
    assert!(
        err.to_string().contains("refusing to start an empty etcd"),
        "{err}"
    );
    let device = paths.dev.join("nvme1n1");
    assert_eq!(
        volume::probe(&std::fs::read(&device).unwrap()),
        volume::Contents::Blank
    );
    // A restore, said so in the stack config, may start afresh.
    common::settings(&mut ctx.config).restore = true;
    let report = volume::run(&common::as_master(&ctx), &paths.etcd_data)
        .await
        .unwrap();
    assert!(report.detail.contains("formatted"), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_left_stopping_for_40s_is_waited_for_stand_in_state_from_the_proxy() {
    let (w, _root, proxy, old, new) = hand_over().await;
    let paths = old.paths.clone();
    // moto stops it at once; EC2 would show `stopping` for a while, with
    // the volume still attached.
    w.aws
        .ec2
        .stop_instances()
        .instance_ids(&old.instance.id)
        .send()
        .await
        .unwrap();
    let started = Instant::now();
    proxy.report_instance_state(
        &old.instance.id,
        "stopping",
        64,
        started + Duration::from_secs(40),
    );
    let report = volume::run(&common::as_master(&new), &paths.etcd_data)
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(40), "{waited:?}");
    assert!(waited < Duration::from_secs(90), "{waited:?}");
    // No detach while it was stopping; then one, plain.
    taken_over_without_force(&w, &proxy, &old, &new, &report).await;
}
