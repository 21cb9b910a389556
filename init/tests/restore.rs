//! The cluster's data volume found by its tag, and restored from its newest
//! EBS snapshot by a master in another zone, against a real moto server
//! with the master's role enforced (actions only: the tag conditions that
//! scope these calls are checked by `policies.rs`'s own evaluator). Every
//! assertion reads back through the EC2 API.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification, Volume};
use common::*;
use slipway_init::steps::restore::{self, DATA_TAG, RESTORING_TAG, SUPERSEDED_TAG};
use slipway_init::steps::{Context, Instance};
use std::time::Duration;

const ZONE_A: &str = "us-east-1a";
const ZONE_B: &str = "us-east-1b";

/// A master instance in `zone`, and a step context for it.
async fn master_in(w: &World, zone: &str, secrets: &std::path::Path) -> Context {
    let ami = ami(&w.aws).await;
    let run = w
        .aws
        .ec2
        .run_instances()
        .image_id(ami)
        .min_count(1)
        .max_count(1)
        .placement(
            aws_sdk_ec2::types::Placement::builder()
                .availability_zone(zone)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut ctx = context(w, "master", 0, secrets);
    ctx.instance = Instance {
        id: run.instances()[0].instance_id().unwrap().to_owned(),
        availability_zone: zone.to_owned(),
    };
    ctx.deadlines.set("volume-available=20").unwrap();
    ctx
}

/// A snapshot of `volume` tagged as Data Lifecycle Manager tags its own
/// (the volume's tags copied), for `cluster`.
async fn snapshot(w: &World, volume: &str, cluster: &str) -> String {
    let t = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let id = w
        .aws
        .ec2
        .create_snapshot()
        .volume_id(volume)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Snapshot)
                .tags(t("slipway:cluster", cluster))
                .tags(t(DATA_TAG, cluster))
                .tags(t("slipway:backup", "dlm"))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_owned();
    // Snapshots are ordered by their start time, which has a second's
    // resolution in some replies: keep them a second apart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    id
}

/// A volume as a restore into `zone` leaves it right after its create.
async fn restoring_volume(w: &World, zone: &str, snapshot: &str) -> String {
    let t = |k: &str| Tag::builder().key(k).value("demo").build();
    w.aws
        .ec2
        .create_volume()
        .availability_zone(zone)
        .snapshot_id(snapshot)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                .tags(t("slipway:cluster"))
                .tags(t(RESTORING_TAG))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .volume_id()
        .unwrap()
        .to_owned()
}

async fn describe(w: &World, volume: &str) -> Volume {
    w.aws
        .ec2
        .describe_volumes()
        .volume_ids(volume)
        .send()
        .await
        .unwrap()
        .volumes()[0]
        .clone()
}

fn tag<'a>(v: &'a Volume, key: &str) -> Option<&'a str> {
    v.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// Every volume of the cluster.
async fn cluster_volumes(w: &World) -> Vec<Volume> {
    w.aws
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("tag:slipway:cluster")
                .values("demo")
                .build(),
        )
        .send()
        .await
        .unwrap()
        .volumes()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_in_another_zone_restores_the_newest_snapshot_and_the_tag_moves() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let _older = snapshot(&w, &old, "demo").await;
    let newest = snapshot(&w, &old, "demo").await;
    // Newer, but another cluster's: never a candidate.
    let other = data_volume_in(&w, ZONE_A).await;
    let _foreign = snapshot(&w, &other, "another").await;
    w.aws
        .ec2
        .delete_volume()
        .volume_id(&other)
        .send()
        .await
        .unwrap();

    // A master in the volume's own zone uses it, snapshots or not.
    let here = master_in(&w, ZONE_A, secrets.path()).await;
    let found = restore::locate(&here).await.unwrap();
    assert_eq!(
        (found.volume_id.as_str(), found.restored),
        (old.as_str(), None)
    );

    let there = master_in(&w, ZONE_B, secrets.path()).await;
    let restored = restore::locate(&there).await.unwrap();
    let new = describe(&w, &restored.volume_id).await;
    let said = restored.restored.unwrap();
    assert!(said.contains(&newest) && said.contains(&old), "{said}");
    assert_eq!(new.availability_zone(), Some(ZONE_B));
    assert_eq!(new.snapshot_id(), Some(newest.as_str()));
    assert_eq!(new.encrypted(), Some(true));
    assert_eq!(tag(&new, DATA_TAG), Some("demo"));
    assert_eq!(tag(&new, RESTORING_TAG), None);
    assert_eq!(tag(&new, "slipway:restored-from"), Some(newest.as_str()));
    let old_now = describe(&w, &old).await;
    assert_eq!(
        tag(&old_now, SUPERSEDED_TAG),
        Some(new.volume_id().unwrap())
    );
    assert_eq!(
        tag(&old_now, DATA_TAG),
        None,
        "the old volume is off the snapshot policy's target"
    );

    // The next boot in zone b finds the restored volume and does nothing.
    let again = restore::locate(&there).await.unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    assert!(again.restored.is_none());
    // And a master back in zone a does not take the superseded volume:
    // the cluster's volume is now in b, so it would restore in turn.
    let back = restore::locate(&here).await.unwrap();
    assert_ne!(back.volume_id, old);
    assert_eq!(cluster_volumes(&w).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_stopped_halfway_is_resumed_without_a_second_volume() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let snap = snapshot(&w, &old, "demo").await;
    let there = master_in(&w, ZONE_B, secrets.path()).await;

    // Stopped right after the create: the volume exists, still restoring.
    let started = restoring_volume(&w, ZONE_B, &snap).await;
    // A restore begun in another zone is not this master's to finish.
    let elsewhere = restoring_volume(&w, "us-east-1c", &snap).await;
    // …and stopped again after superseding the old volume.
    w.aws
        .ec2
        .create_tags()
        .resources(&old)
        .tags(Tag::builder().key(SUPERSEDED_TAG).value(&started).build())
        .send()
        .await
        .unwrap();

    let resumed = restore::locate(&there).await.unwrap();
    assert_eq!(resumed.volume_id, started);
    assert!(
        resumed.restored.unwrap().contains("finished restoring"),
        "the report says it resumed"
    );
    let new = describe(&w, &started).await;
    assert_eq!(tag(&new, DATA_TAG), Some("demo"));
    assert_eq!(tag(&new, RESTORING_TAG), None);
    assert_eq!(
        tag(&describe(&w, &elsewhere).await, RESTORING_TAG),
        Some("demo")
    );
    assert_eq!(cluster_volumes(&w).await.len(), 3, "no volume was added");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_snapshot_a_master_in_another_zone_refuses_and_changes_nothing() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let there = master_in(&w, ZONE_B, secrets.path()).await;
    let err = restore::locate(&there).await.unwrap_err().to_string();
    assert!(
        err.contains(&old) && err.contains(ZONE_A) && err.contains(ZONE_B),
        "{err}"
    );
    assert!(err.contains("no completed EBS snapshot"), "{err}");
    assert_eq!(cluster_volumes(&w).await.len(), 1);
    assert_eq!(tag(&describe(&w, &old).await, DATA_TAG), Some("demo"));

    // Two volumes tagged as the cluster's are a person's mistake: refused.
    let second = data_volume_in(&w, ZONE_B).await;
    let err = restore::locate(&there).await.unwrap_err().to_string();
    assert!(err.contains(&old) && err.contains(&second), "{err}");
}
