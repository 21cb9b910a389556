//! Publishing against a local AWS (moto, started per test), on small
//! synthetic builds (no image needed, so these run in `just check`): AMIs
//! appear in three regions and a second run creates nothing; a different
//! disk under the same version is refused; a failed run deletes what it
//! made; a release that skips a Kubernetes minor is refused; the rendered
//! template passes cfn-lint and checkov and creates a stack whose groups
//! boot the mapped AMI.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use image_builder::publish::{self, Release};
use vm_tests::moto::Moto;
use vm_tests::releases::{count, publish_dir as publish, synthetic_build, target, HOME};

const COPIES: [&str; 2] = ["eu-west-1", "ap-southeast-2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amis_in_three_regions_then_nothing_new_then_a_clash_is_refused() {
    let out = synthetic_build(b"a disk in three regions").unwrap();
    let moto = Moto::start().unwrap();
    let first = publish(out.path(), &target(&moto, &COPIES)).await.unwrap();
    let regions: Vec<&str> = first.amis.keys().map(String::as_str).collect();
    assert_eq!(regions, ["ap-southeast-2", "eu-west-1", "us-east-1"]);
    let steps = |r: &Release| -> Vec<String> { r.stages.iter().map(|s| s.stage.clone()).collect() };
    assert_eq!(steps(&first), ["upload", "register", "copies", "template"]);
    for (region, ami) in &first.amis {
        let c = publish::Clients::new(region, Some(&moto.endpoint)).await;
        let found = publish::ami::find(&c.ec2, "slipway-0.1.0")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&found.image_id, ami);
        assert_eq!(
            found.disk_sha256.as_deref(),
            Some(first.disk_sha256.as_str())
        );
        let param = c
            .ssm
            .get_parameter()
            .name("/slipway/latest/image-id")
            .send()
            .await
            .unwrap();
        assert_eq!(param.parameter().unwrap().value(), Some(ami.as_str()));
    }
    // The template names exactly these AMIs.
    let template: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("template.json")).unwrap()).unwrap();
    for (region, ami) in &first.amis {
        assert_eq!(
            template["Mappings"]["RegionMap"][region]["AMI"],
            ami.as_str()
        );
    }
    assert_eq!(
        template["Mappings"]["RegionMap"].as_object().unwrap().len(),
        3
    );
    let on_disk: Release =
        serde_json::from_slice(&std::fs::read(out.path().join("release.json")).unwrap()).unwrap();
    assert_eq!(on_disk, first);

    // Again: the same AMIs, and nothing new anywhere.
    let mut before = Vec::new();
    for r in first.amis.keys() {
        before.push(count(&moto, r).await.unwrap());
    }
    let second = publish(out.path(), &target(&moto, &COPIES)).await.unwrap();
    assert_eq!(second.amis, first.amis);
    assert!(second.upload.is_none(), "the second run uploaded again");
    assert_eq!(
        steps(&second),
        ["template"],
        "the second run did more than render"
    );
    let mut after = Vec::new();
    for r in first.amis.keys() {
        after.push(count(&moto, r).await.unwrap());
    }
    assert_eq!(before, after);

    // Another disk under the same version: refused before creating anything.
    let other = synthetic_build(b"a different disk").unwrap();
    let err = publish(other.path(), &target(&moto, &COPIES))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, publish::PublishError::VersionClash { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("slipway-0.1.0") && msg.contains("new version"),
        "{msg}"
    );
    let mut after_clash = Vec::new();
    for r in first.amis.keys() {
        after_clash.push(count(&moto, r).await.unwrap());
    }
    assert_eq!(before, after_clash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_deletes_what_it_created() {
    let out = synthetic_build(b"a disk that fails to publish").unwrap();
    let moto = Moto::start().unwrap();
    // SSM refuses parameter names under /aws: that happens after the
    // snapshot and the image were created, and both must go.
    let mut t = target(&moto, &[]);
    t.ssm_prefix = Some("/aws/slipway".into());
    let err = publish(out.path(), &t).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("writing SSM parameter /aws/slipway/0.1.0/image-id"),
        "{msg}"
    );
    assert!(msg.contains("cleaned up: image ami-"), "{msg}");
    assert!(msg.contains("snapshot snap-"), "{msg}");
    let c = publish::Clients::new(HOME, Some(&moto.endpoint)).await;
    assert!(publish::ami::find(&c.ec2, "slipway-0.1.0")
        .await
        .unwrap()
        .is_none());
    // (moto's RegisterImage makes a snapshot of its own, which AWS does
    // not; so look for ours by ID rather than count them.)
    let ours = msg
        .split("snapshot ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let left = c.ec2.describe_snapshots().snapshot_ids(ours).send().await;
    assert!(
        left.map_or(true, |d| d.snapshots().is_empty()),
        "{ours} still exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_skips_a_kubernetes_minor_is_refused_before_any_upload() {
    let out = synthetic_build(b"a disk for an update").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("build-manifest.json")).unwrap())
            .unwrap();
    let shipped = manifest["payload"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "kubelet")
        .unwrap()["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let ships = publish::skew::Version::parse(&shipped).unwrap();
    let moto = Moto::start().unwrap();
    let before = count(&moto, HOME).await.unwrap();
    let mut t = target(&moto, &[]);
    let two_behind = format!("v{}.{}.0", ships.major, ships.minor - 2);
    t.current_kubernetes = Some(two_behind.clone());
    let msg = publish(out.path(), &t).await.unwrap_err().to_string();
    assert!(
        msg.contains(&format!("cannot be updated to {ships}")),
        "{msg}"
    );
    assert!(msg.contains("skips"), "{msg}");
    assert!(
        !out.path().join("release.json").exists(),
        "a refused release was written"
    );
    assert_eq!(
        count(&moto, HOME).await.unwrap(),
        before,
        "something was uploaded"
    );
    // One minor behind is the supported step.
    t.current_kubernetes = Some(format!("v{}.{}.9", ships.major, ships.minor - 1));
    let release = publish(out.path(), &t).await.unwrap();
    assert_eq!(release.kubernetes, ships.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_lints_clean_and_creates_a_stack_on_the_mapped_ami() {
    let out = synthetic_build(b"a disk for the stack").unwrap();
    let moto = Moto::start().unwrap();
    let release = publish(out.path(), &target(&moto, &[])).await.unwrap();
    let template_path = out.path().join("template.json");

    // cfn-lint, pinned in vm-tests/requirements.txt: no errors, no warnings,
    // in every region the release has an image in.
    let regions: Vec<&str> = release.amis.keys().map(String::as_str).collect();
    let lint = std::process::Command::new(vm_tests::moto::venv_bin("cfn-lint"))
        .arg("--regions")
        .args(&regions)
        .arg("--")
        .arg(&template_path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&lint.stdout);
    assert!(
        lint.status.success() && report.trim().is_empty(),
        "cfn-lint ({regions:?}):\n{report}"
    );
    // checkov, pinned in vm-tests/requirements-checkov.txt, in a network
    // namespace of its own (it would otherwise fetch guidelines from its
    // vendor): no failed check; the skips carry their reasons in the template.
    let checkov = std::process::Command::new("unshare")
        .arg("--net")
        .arg(vm_tests::moto::checkov_bin())
        .args([
            "--framework",
            "cloudformation",
            "--compact",
            "--skip-download",
            "-f",
        ])
        .arg(&template_path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&checkov.stdout);
    assert!(
        checkov.status.success() && report.contains("Failed checks: 0,"),
        "checkov:\n{report}\n{}",
        String::from_utf8_lossy(&checkov.stderr)
    );

    let conf = slipway_init::sdk::config_loader()
        .region(aws_config::Region::new(HOME))
        .endpoint_url(&moto.endpoint)
        .load()
        .await;
    let cfn = aws_sdk_cloudformation::Client::new(&conf);
    let body = std::fs::read_to_string(&template_path).unwrap();
    cfn.create_stack()
        .stack_name("demo")
        .template_body(body)
        .parameters(
            aws_sdk_cloudformation::types::Parameter::builder()
                .parameter_key("AdminCidr")
                .parameter_value("203.0.113.0/24")
                .build(),
        )
        .capabilities(aws_sdk_cloudformation::types::Capability::CapabilityIam)
        .send()
        .await
        .unwrap();
    let mut status = String::new();
    for _ in 0..120 {
        let d = cfn
            .describe_stacks()
            .stack_name("demo")
            .send()
            .await
            .unwrap();
        status = d.stacks()[0].stack_status().unwrap().as_str().to_owned();
        if !status.ends_with("IN_PROGRESS") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let stack = cfn
        .describe_stacks()
        .stack_name("demo")
        .send()
        .await
        .unwrap();
    let stack = &stack.stacks()[0];
    assert_eq!(
        status,
        "CREATE_COMPLETE",
        "{:?}",
        stack.stack_status_reason()
    );

    // Both groups launched their instances from the mapped AMI.
    let asg = aws_sdk_autoscaling::Client::new(&conf);
    let groups = asg.describe_auto_scaling_groups().send().await.unwrap();
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let mut launched = 0;
    for g in groups.auto_scaling_groups() {
        for i in g.instances() {
            let d = ec2
                .describe_instances()
                .instance_ids(i.instance_id().unwrap())
                .send()
                .await
                .unwrap();
            let inst = &d.reservations()[0].instances()[0];
            assert_eq!(inst.image_id(), Some(release.amis[HOME].as_str()));
            // Tagged with the release and the Kubernetes version it runs.
            let tag = |key: &str| {
                inst.tags()
                    .iter()
                    .find(|t| t.key() == Some(key))
                    .and_then(|t| t.value())
                    .map(str::to_owned)
            };
            assert_eq!(tag("slipway:release"), Some(release.image_version.clone()));
            assert_eq!(tag("slipway:kubernetes"), Some(release.kubernetes.clone()));
            launched += 1;
        }
    }
    assert_eq!(launched, 3, "one master and two nodes");

    let outputs: std::collections::BTreeMap<&str, &str> = stack
        .outputs()
        .iter()
        .map(|o| (o.output_key().unwrap(), o.output_value().unwrap()))
        .collect();
    assert!(
        outputs["ApiEndpoint"].starts_with("https://"),
        "{outputs:?}"
    );
    assert!(outputs["ApiEndpoint"].ends_with(":6443"), "{outputs:?}");
    let bucket = outputs["SecretsBucketName"];
    assert_eq!(
        outputs["AdminKubeconfig"],
        format!("s3://{bucket}/slipway/admin.conf")
    );
}
