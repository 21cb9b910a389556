//! IAM enforced by moto (`vm_tests::iam`): the template's roles, as moto
//! can enforce them (action names and S3 ARNs; conditions and the other
//! resources are evaluated elsewhere), refuse what a member does not call
//! and what is not its own; a grant taken out of the template fails the
//! step that needs it, naming the action.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::*;
use slipway_init::steps::{self, secrets};

/// `template` with `action` taken out of every statement of `role`.
fn without(role: &str, action: &str) -> serde_json::Value {
    let mut t = template();
    let statements = t["Resources"][role]["Properties"]["Policies"][0]["PolicyDocument"]
        ["Statement"]
        .as_array_mut()
        .unwrap();
    for st in statements.iter_mut() {
        if let serde_json::Value::Array(list) = &mut st["Action"] {
            list.retain(|a| a != action);
        }
    }
    statements.retain(|st| st["Action"] != action);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_taken_out_of_the_template_fails_its_step_naming_the_action_moto_iam() {
    let w = world_with(1, &without("MasterRole", "ec2:AssociateAddress")).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let err = steps::eip::run(&common::as_master(&ctx))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("ec2:AssociateAddress"), "{err}");
    assert!(err.contains("AccessDenied"), "{err}");
    // Nothing was associated.
    assert_ne!(
        eip_holder(&w).await.0.as_deref(),
        Some(ctx.instance.id.as_str())
    );

    // With the template as it is, the same step passes.
    let w = world(1).await;
    let ctx = context(&w, "master", 0, dir.path());
    steps::eip::run(&common::as_master(&ctx)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reads_its_bundle_and_nothing_else_of_the_clusters_moto_iam() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let master = context(&w, "master", 0, &dir.path().join("srv/kubernetes"));
    secrets::master(&common::as_master(&master), None)
        .await
        .unwrap();

    let node = w.clients("node");
    let read = |key: String| {
        let s3 = node.s3.clone();
        async move { s3.get_object().bucket(BUCKET).key(key).send().await }
    };
    read(secrets::node_key("demo")).await.unwrap();
    for key in [secrets::pki_key("demo"), secrets::admin_key("demo")] {
        let err = read(key.clone()).await.unwrap_err();
        let status = err.raw_response().map(|r| r.status().as_u16());
        assert_eq!(status, Some(403), "the node read {key}: {err:?}");
    }
    // Nor may it write the bundle it reads.
    let put = node
        .s3
        .put_object()
        .bucket(BUCKET)
        .key(secrets::node_key("demo"))
        .body(b"{}".to_vec().into())
        .send()
        .await;
    assert!(put.is_err(), "the node overwrote node.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_may_not_take_the_masters_volume_or_address_moto_iam() {
    let w = world(1).await;
    let node = w.clients("node");
    let me = &w.instances[0].id;
    let attach = node
        .ec2
        .attach_volume()
        .volume_id(&w.volume)
        .instance_id(me)
        .device("/dev/sdf")
        .send()
        .await
        .unwrap_err();
    assert!(
        slipway_init::aws::describe(&attach).contains("AccessDenied"),
        "{attach:?}"
    );
    let associate = node
        .ec2
        .associate_address()
        .allocation_id(&w.alloc)
        .instance_id(me)
        .send()
        .await
        .unwrap_err();
    assert!(
        slipway_init::aws::describe(&associate).contains("AccessDenied"),
        "{associate:?}"
    );
}
