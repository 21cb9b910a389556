//! The cluster's data volume found by its tag, and restored from its newest
//! EBS snapshot by a master in another zone, against a real moto server
//! with the master's role enforced (actions only: the tag conditions that
//! scope these calls are checked by `policies.rs`'s own evaluator). Every
//! assertion reads back through the EC2 API.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification, Volume};
use common::*;
use sha2::{Digest, Sha256};
use slipway_init::config::RestoreFrom;
use slipway_init::steps::restore::{self, DATA_TAG, RESTORING_TAG, SUPERSEDED_TAG};
use slipway_init::steps::{self, backup, Context, Instance};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use time::OffsetDateTime;

const MINUTE: time::Duration = time::Duration::minutes(1);

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

/// The cluster's volume in a zone that is lost: still attached to its
/// master there, as EC2 keeps saying while the zone is down.
async fn held_in_lost_zone(w: &World, zone: &str, secrets: &std::path::Path) -> String {
    let volume = data_volume_in(w, zone).await;
    let dead = master_in(w, zone, secrets).await;
    w.aws
        .ec2
        .attach_volume()
        .volume_id(&volume)
        .instance_id(&dead.instance.id)
        .device("/dev/xvdf")
        .send()
        .await
        .unwrap();
    volume
}

/// The snapshots EC2 holds of `volume`.
async fn snapshots_of(w: &World, volume: &str) -> Vec<aws_sdk_ec2::types::Snapshot> {
    w.aws
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(Filter::builder().name("volume-id").values(volume).build())
        .send()
        .await
        .unwrap()
        .snapshots()
        .to_vec()
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

/// The cluster's restore records, oldest first, read back from SSM's
/// parameter history (none before the first restore).
async fn records(w: &World) -> Vec<serde_json::Value> {
    let history = w
        .aws
        .ssm
        .get_parameter_history()
        .name(restore::record_name("demo"))
        .send()
        .await;
    let Ok(history) = history else {
        return Vec::new();
    };
    history
        .parameters()
        .iter()
        .map(|p| serde_json::from_str(p.value().unwrap()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_in_another_zone_restores_the_newest_snapshot_and_the_tag_moves() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = held_in_lost_zone(&w, ZONE_A, secrets.path()).await;
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
    let found = restore::locate(&common::as_master(&here)).await.unwrap();
    assert_eq!(
        (found.volume_id.as_str(), found.restored),
        (old.as_str(), None)
    );

    let there = master_in(&w, ZONE_B, secrets.path()).await;
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
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
    // The restore is on record: which snapshot, of which volume, into which.
    let recorded = records(&w).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let r = &recorded[0];
    assert_eq!(r["snapshot"], newest.as_str());
    assert_eq!(r["snapshot_of"], old.as_str());
    assert!(r["snapshot_taken"].is_string(), "{r}");
    assert_eq!(r["volume"], new.volume_id().unwrap());
    assert_eq!(r["zone"], ZONE_B);
    assert_eq!(r["superseded"], old.as_str());
    assert_eq!(r["instance"], there.instance.id.as_str());
    assert_eq!(r["resumed"], false);

    // The next boot in zone b finds the restored volume and does nothing.
    let again = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    assert!(again.restored.is_none());
    // And a master back in zone a does not take the superseded volume:
    // the cluster's volume is now in b, so it would restore in turn.
    let back = restore::locate(&common::as_master(&here)).await.unwrap();
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

    let resumed = restore::locate(&common::as_master(&there)).await.unwrap();
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
    let recorded = records(&w).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["volume"], started.as_str());
    assert_eq!(recorded[0]["resumed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_snapshot_or_a_backup_a_master_in_another_zone_refuses_and_changes_nothing() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = held_in_lost_zone(&w, ZONE_A, secrets.path()).await;
    let there = master_in(&w, ZONE_B, secrets.path()).await;
    let err = restore::locate(&common::as_master(&there))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&old) && err.contains(ZONE_A) && err.contains(ZONE_B),
        "{err}"
    );
    assert!(
        err.contains("neither a completed EBS snapshot") && err.contains("etcd backup"),
        "{err}"
    );
    assert_eq!(cluster_volumes(&w).await.len(), 1);
    assert!(
        records(&w).await.is_empty(),
        "nothing restored, nothing recorded"
    );
    assert_eq!(tag(&describe(&w, &old).await, DATA_TAG), Some("demo"));

    // Two volumes tagged as the cluster's are a person's mistake: refused.
    let second = data_volume_in(&w, ZONE_B).await;
    let err = restore::locate(&common::as_master(&there))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&old) && err.contains(&second), "{err}");
}

/// `slipway-init restore …` as a person runs it on the master, as the
/// master's role.
fn restore_command(w: &World, ctx: &Context, dir: &std::path::Path) -> std::process::Command {
    let config = dir.join("stack.toml");
    std::fs::write(&config, config_text(w, "master")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_slipway-init"));
    cmd.envs(w.master.env())
        .args(["--aws-endpoint", &w.moto.endpoint, "--config"])
        .arg(&config)
        .args([
            "--instance-id",
            &ctx.instance.id,
            "--availability-zone",
            &ctx.instance.availability_zone,
            "restore",
        ]);
    cmd
}

fn run(mut cmd: std::process::Command, args: &[&str]) -> (bool, String) {
    let out = cmd.args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_rolls_back_to_a_named_snapshot_after_a_dry_run() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let older = snapshot(&w, &old, "demo").await;
    let newest = snapshot(&w, &old, "demo").await;
    let foreign = snapshot(&w, &old, "another").await;
    let master = master_in(&w, ZONE_A, dir.path()).await;
    let cmd = || restore_command(&w, &master, dir.path());
    // The master runs on the current volume.
    w.aws
        .ec2
        .attach_volume()
        .volume_id(&old)
        .instance_id(&master.instance.id)
        .device("/dev/xvdf")
        .send()
        .await
        .unwrap();

    // The list: the volume, and the snapshots with the newest marked.
    let (ok, listed) = run(cmd(), &["--list"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains(&old) && listed.contains("the cluster's etcd data"),
        "{listed}"
    );
    let marked = listed.lines().find(|l| l.contains("<- newest")).unwrap();
    assert!(marked.contains(&newest), "{listed}");
    assert!(
        listed.contains(&older) && !listed.contains(&foreign),
        "{listed}"
    );

    // Asked without --yes: said, nothing changed.
    let (ok, said) = run(cmd(), &["--snapshot", &older]);
    assert!(
        ok && said.contains("would restore") && said.contains(&old),
        "{said}"
    );
    assert_eq!(cluster_volumes(&w).await.len(), 1);
    // Another cluster's snapshot, or none: refused, nothing changed.
    for refused in [foreign.as_str(), "snap-0123456789abcdef0"] {
        let (ok, said) = run(cmd(), &["--snapshot", refused, "--yes"]);
        assert!(!ok && said.contains(refused), "{said}");
    }
    assert_eq!(cluster_volumes(&w).await.len(), 1);
    // Neither a list nor a snapshot: a usage error.
    let (ok, said) = run(cmd(), &["--yes"]);
    assert!(!ok && said.contains("--snapshot"), "{said}");

    let (ok, said) = run(cmd(), &["--snapshot", &older, "--yes"]);
    assert!(ok && said.contains(&master.instance.id), "{said}");
    let current = restore::locate(&common::as_master(&master)).await.unwrap();
    assert!(
        current.restored.is_none(),
        "the next boot finds it in place"
    );
    let new = describe(&w, &current.volume_id).await;
    assert_eq!(new.snapshot_id(), Some(older.as_str()));
    assert_eq!(new.availability_zone(), Some(ZONE_A));
    assert!(tag(&new, "slipway:restored-at").is_some());
    assert_eq!(
        tag(&describe(&w, &old).await, SUPERSEDED_TAG),
        Some(current.volume_id.as_str())
    );
    let recorded = records(&w).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["snapshot"], older.as_str());
    assert_eq!(recorded[0]["volume"], current.volume_id.as_str());
    let (_, listed) = run(cmd(), &["--list"]);
    assert!(
        listed.contains(&format!("superseded by {}", current.volume_id))
            && listed.contains(&format!("restored from {older}")),
        "{listed}"
    );

    // Rebooted rather than replaced: the old volume is still attached at
    // /dev/xvdf, so the restored one takes the next free name.
    let sys = tempfile::tempdir().unwrap();
    let mut ctx = master;
    ctx.paths.nvme_class = sys.path().join("nvme");
    ctx.paths.dev = sys.path().join("dev");
    ctx.paths.proc = sys.path().join("proc");
    ctx.runner = Box::new(FileDevices::default());
    let serial = ctx.paths.nvme_class.join("nvme1");
    for d in [&serial, &ctx.paths.dev, &ctx.paths.proc] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(serial.join("serial"), current.volume_id.replace('-', "")).unwrap();
    std::fs::File::create(ctx.paths.dev.join("nvme1n1"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mount_point = sys.path().join("var/lib/etcd");
    steps::volume::run(&common::as_master(&ctx), &mount_point)
        .await
        .unwrap();
    let attachments = |v: &Volume| -> Vec<(String, String)> {
        v.attachments()
            .iter()
            .map(|a| {
                (
                    a.instance_id().unwrap_or("").to_owned(),
                    a.device().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let me = ctx.instance.id.clone();
    assert_eq!(
        attachments(&describe(&w, &current.volume_id).await),
        vec![(me.clone(), "/dev/xvdg".to_owned())]
    );
    assert_eq!(
        attachments(&describe(&w, &old).await),
        vec![(me, "/dev/xvdf".to_owned())]
    );
}

/// An etcd backup as the master's timer leaves it.
async fn etcd_backup(w: &World, taken: OffsetDateTime, revision: u64, body: &[u8]) -> String {
    let sha256 = hex::encode(Sha256::digest(body));
    put_backup(w, taken, revision, body, &sha256).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_backup_newer_than_the_snapshots_is_restored_into_an_empty_volume() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = held_in_lost_zone(&w, ZONE_A, secrets.path()).await;
    let snap = snapshot(&w, &old, "demo").await;
    let older_backup = etcd_backup(&w, OffsetDateTime::now_utc() - MINUTE * 60, 41, b"a").await;
    let newest = etcd_backup(&w, OffsetDateTime::now_utc() + MINUTE, 4242, b"b").await;

    let there = master_in(&w, ZONE_B, secrets.path()).await;
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(restored.fill_from.as_deref(), Some(newest.as_str()));
    let new = describe(&w, &restored.volume_id).await;
    assert_eq!(new.availability_zone(), Some(ZONE_B));
    assert!(
        new.snapshot_id().unwrap_or_default().is_empty(),
        "made empty, not from {snap}: {new:?}"
    );
    assert_eq!(
        new.size(),
        describe(&w, &old).await.size(),
        "as large as the old"
    );
    assert_eq!(tag(&new, "slipway:restored-from"), Some(newest.as_str()));
    assert_eq!(tag(&new, DATA_TAG), Some("demo"));
    assert_eq!(
        tag(&describe(&w, &old).await, SUPERSEDED_TAG),
        new.volume_id()
    );
    let recorded = records(&w).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["backup"], newest.as_str());
    assert_eq!(recorded[0]["revision"], 4242);
    assert!(recorded[0].get("snapshot").is_none(), "{recorded:?}");
    assert_ne!(older_backup, newest);

    // Its next boot finds it in place, still to be filled until etcd's
    // data directory is on it.
    let again = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(again.volume_id, restored.volume_id);
    assert!(again.restored.is_none());
    assert_eq!(again.fill_from.as_deref(), Some(newest.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setting_prefers_the_volume_snapshot_over_a_newer_etcd_backup() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = held_in_lost_zone(&w, ZONE_A, secrets.path()).await;
    let snap = snapshot(&w, &old, "demo").await;
    etcd_backup(&w, OffsetDateTime::now_utc() + MINUTE, 7, b"b").await;
    let mut there = master_in(&w, ZONE_B, secrets.path()).await;
    common::settings(&mut there.config).restore_from = RestoreFrom::VolumeSnapshot;
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(restored.fill_from, None);
    let new = describe(&w, &restored.volume_id).await;
    assert_eq!(new.snapshot_id(), Some(snap.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_an_etcd_backup_the_restore_uses_it_whatever_the_setting() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    // The volume is gone and no snapshot was ever taken.
    let key = etcd_backup(&w, OffsetDateTime::now_utc(), 9, b"c").await;
    let mut there = master_in(&w, ZONE_B, secrets.path()).await;
    common::settings(&mut there.config).restore_from = RestoreFrom::VolumeSnapshot;
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(restored.fill_from.as_deref(), Some(key.as_str()));
    let new = describe(&w, &restored.volume_id).await;
    assert_eq!(new.size(), Some(restore::DEFAULT_VOLUME_GIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_old_zone_answers_a_fresh_snapshot_of_the_volume_is_restored() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    // The old master is gone and its volume let go: `available` in zone a.
    let old = data_volume_in(&w, ZONE_A).await;
    let dlm = snapshot(&w, &old, "demo").await;
    // Newer than the snapshot policy's, older than now.
    etcd_backup(&w, OffsetDateTime::now_utc() - MINUTE, 7, b"b").await;

    let there = master_in(&w, ZONE_B, secrets.path()).await;
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(restored.fill_from, None, "not from the etcd backup");
    let new = describe(&w, &restored.volume_id).await;
    let fresh = new.snapshot_id().unwrap().to_owned();
    assert_ne!(fresh, dlm, "not from the snapshot policy's either");
    let taken = snapshots_of(&w, &old).await;
    let snap = taken
        .iter()
        .find(|s| s.snapshot_id() == Some(fresh.as_str()))
        .unwrap();
    let stag = |k: &str| {
        snap.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
    };
    assert_eq!(stag(DATA_TAG), Some("demo"));
    assert_eq!(stag("slipway:cluster"), Some("demo"));
    assert_eq!(
        stag(restore::FRESH_FOR_TAG),
        Some(there.instance.id.as_str())
    );
    assert_eq!(new.availability_zone(), Some(ZONE_B));
    assert_eq!(tag(&new, DATA_TAG), Some("demo"));
    assert_eq!(
        tag(&describe(&w, &old).await, SUPERSEDED_TAG),
        new.volume_id()
    );
    let recorded = records(&w).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["snapshot"], fresh.as_str());
    assert_eq!(recorded[0]["snapshot_of"], old.as_str());
    assert_eq!(taken.len(), 2, "one snapshot taken: {taken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_after_the_fresh_snapshot_waits_for_it_rather_than_taking_another() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let there = master_in(&w, ZONE_B, secrets.path()).await;
    // The boot before stopped right after starting its snapshot.
    let t = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let started = w
        .aws
        .ec2
        .create_snapshot()
        .volume_id(&old)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Snapshot)
                .tags(t("slipway:cluster", "demo"))
                .tags(t(DATA_TAG, "demo"))
                .tags(t(restore::FRESH_FOR_TAG, &there.instance.id))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_owned();
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
    let new = describe(&w, &restored.volume_id).await;
    assert_eq!(new.snapshot_id(), Some(started.as_str()));
    assert_eq!(snapshots_of(&w, &old).await.len(), 1, "no second snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferring_etcd_backups_takes_no_fresh_snapshot() {
    let w = world(1).await;
    let secrets = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let key = etcd_backup(&w, OffsetDateTime::now_utc() - MINUTE, 9, b"c").await;
    let mut there = master_in(&w, ZONE_B, secrets.path()).await;
    common::settings(&mut there.config).restore_from = RestoreFrom::EtcdBackup;
    let restored = restore::locate(&common::as_master(&there)).await.unwrap();
    assert_eq!(restored.fill_from.as_deref(), Some(key.as_str()));
    assert!(snapshots_of(&w, &old).await.is_empty());
}

/// Plays etcdutl: records its arguments, and makes the data directory it
/// is asked for as `snapshot restore` does.
#[derive(Debug, Default, Clone)]
struct FakeEtcdutl {
    calls: std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
}

impl steps::Runner for FakeEtcdutl {
    fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        _input: Option<&Path>,
    ) -> Result<String, steps::StepError> {
        assert!(program.ends_with("/etcdutl"), "{program}");
        let meta = std::fs::metadata(program).unwrap();
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "extracted executable"
        );
        let dir = args.iter().position(|a| *a == "--data-dir").unwrap() + 1;
        std::fs::create_dir_all(Path::new(args[dir]).join("member/snap")).unwrap();
        std::fs::write(Path::new(args[dir]).join("member/snap/db"), b"bolt").unwrap();
        self.calls
            .lock()
            .unwrap()
            .push(args.iter().map(|a| (*a).to_owned()).collect());
        Ok(String::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_empty_volume_is_filled_from_the_backup_once_and_a_bad_one_refused() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let good = etcd_backup(&w, OffsetDateTime::now_utc(), 4242, b"etcd snapshot").await;
    let uploaded = hex::encode(Sha256::digest(b"what was uploaded"));
    let bad = put_backup(
        &w,
        OffsetDateTime::now_utc() + MINUTE,
        4243,
        b"what is stored now",
        &uploaded,
    )
    .await;

    let mut ctx = master_in(&w, ZONE_A, &root.path().join("secrets")).await;
    ctx.paths.images = vm_tests::images::list_with_file(
        &root.path().join("images"),
        "registry.k8s.io/etcd:3.6.13-0",
        "/usr/local/bin/etcdutl",
        b"#!/bin/sh\n",
    )
    .unwrap();
    ctx.paths.run = root.path().join("run");
    let etcdutl = FakeEtcdutl::default();
    ctx.runner = Box::new(etcdutl.clone());
    let mount = root.path().join("var/lib/etcd");
    std::fs::create_dir_all(&mount).unwrap();

    // A backup whose bytes do not match its sha256: refused, nothing made.
    let err = restore::fill(&common::as_master(&ctx), &mount, &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("sha256") && err.contains(&bad), "{err}");
    assert!(!mount.join(restore::ETCD_DATA_DIR).exists());
    assert!(etcdutl.calls.lock().unwrap().is_empty());

    // A staging directory left by a boot cut short is started over.
    std::fs::create_dir_all(mount.join("data.restoring/member")).unwrap();
    std::fs::write(mount.join("data.restoring/member/half"), b"").unwrap();
    let said = restore::fill(&common::as_master(&ctx), &mount, &good)
        .await
        .unwrap()
        .unwrap();
    assert!(
        said.contains("4242") && said.contains("sha256 checked"),
        "{said}"
    );
    let data = mount.join(restore::ETCD_DATA_DIR);
    assert!(data.join("member/snap/db").is_file());
    assert!(
        !data.join("member/half").exists(),
        "the stale staging was removed"
    );
    assert!(!mount.join("data.restoring").exists());
    assert!(!mount.join("slipway-restore.db").exists());
    let calls = etcdutl.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    let args = calls[0].join(" ");
    // A one-member cluster at the master's address, under the name its
    // static pod gives it, every watch made to start over.
    for want in [
        "snapshot restore",
        "--name ip-10-0-1-10",
        "--initial-cluster ip-10-0-1-10=https://10.0.1.10:2380",
        "--initial-advertise-peer-urls https://10.0.1.10:2380",
        "--bump-revision 1000000000 --mark-compacted",
    ] {
        assert!(args.contains(want), "{want} not in {args}");
    }
    // The etcd manifest reads the directory filled.
    let manifest = std::fs::read_to_string(manifests_dir().join("static/etcd.yaml")).unwrap();
    assert!(manifest.contains(&format!(
        "--data-dir=/var/lib/etcd/{}",
        restore::ETCD_DATA_DIR
    )));

    // Once filled, never again.
    assert_eq!(
        restore::fill(&common::as_master(&ctx), &mount, &good)
            .await
            .unwrap(),
        None
    );
    assert_eq!(etcdutl.calls.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_restores_a_named_etcd_backup_into_an_empty_volume() {
    let w = world(1).await;
    let dir = tempfile::tempdir().unwrap();
    let old = data_volume_in(&w, ZONE_A).await;
    let key = etcd_backup(&w, OffsetDateTime::now_utc() - MINUTE * 30, 314, b"etcd").await;
    let master = master_in(&w, ZONE_A, dir.path()).await;
    let cmd = || restore_command(&w, &master, dir.path());

    let (ok, said) = run(cmd(), &["--backup", &key]);
    assert!(
        ok && said.contains("would restore") && said.contains("revision 314"),
        "{said}"
    );
    // Another cluster's key, one not in the bucket, or a snapshot flag
    // beside it: refused, nothing changed.
    let absent = backup::key("demo", OffsetDateTime::now_utc(), 1);
    for (args, named) in [
        (
            vec!["--backup", "another/etcd-backups/x.db", "--yes"],
            "another/",
        ),
        (vec!["--backup", absent.as_str(), "--yes"], absent.as_str()),
        (
            vec!["--backup", &key, "--snapshot", "snap-1", "--yes"],
            "--snapshot",
        ),
    ] {
        let (ok, said) = run(cmd(), &args);
        assert!(!ok && said.contains(named), "{args:?}: {said}");
    }
    assert_eq!(cluster_volumes(&w).await.len(), 1);

    let (ok, said) = run(cmd(), &["--backup", &key, "--yes"]);
    assert!(ok, "{said}");
    let current = restore::locate(&common::as_master(&master)).await.unwrap();
    assert_eq!(current.fill_from.as_deref(), Some(key.as_str()));
    let new = describe(&w, &current.volume_id).await;
    assert_eq!(new.availability_zone(), Some(ZONE_A));
    assert_eq!(new.size(), describe(&w, &old).await.size());
    assert_eq!(
        tag(&describe(&w, &old).await, SUPERSEDED_TAG),
        Some(current.volume_id.as_str())
    );
    let recorded = records(&w).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["backup"], key.as_str());
    assert_eq!(recorded[0]["revision"], 314);
}
