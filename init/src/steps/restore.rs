//! Which volume holds the cluster's etcd data, and a new one in this
//! master's zone when that volume is out of reach.
//!
//! The cluster's volume is the one tagged `slipway:etcd-data=<cluster>`
//! and not `slipway:superseded`: the user data names no volume, so a
//! master in any zone finds it the same way. In the master's own zone it
//! is simply used, whatever else exists. When it is in another zone or
//! gone, the master restores: a volume in its own zone from the newest
//! completed EBS snapshot of the cluster's volume (Data Lifecycle
//! Manager's, which carry the volume's tags). The restore is resumable at
//! every point:
//!
//! 1. the new volume is created tagged `slipway:restoring=<cluster>` (with
//!    a client token derived from the cluster, the zone and the snapshot,
//!    so a retried call returns the same volume), and waited for;
//! 2. the restore is recorded: a new version of the SSM parameter
//!    [`record_name`] says which snapshot, taken when, of which volume,
//!    into which volume, superseding which;
//! 3. the old volume is tagged `slipway:superseded=<new volume>` and
//!    loses `slipway:etcd-data`, so Data Lifecycle Manager stops
//!    snapshotting it (it is never deleted: a person decides);
//! 4. the new volume is tagged `slipway:etcd-data=<cluster>` and loses
//!    `slipway:restoring`.
//!
//! When the old volume's zone still answers (the volume is `available`:
//! its master is gone but the volume is not), the restore takes a fresh
//! EBS snapshot of it first, so nothing written since the last backup is
//! lost; a snapshot that does not complete in time is left to finish on
//! its own and the newest backup is used instead.
//!
//! A boot that stops anywhere finds, next time, either the new volume as
//! the cluster's or its `slipway:restoring` volume in its zone, and goes
//! on from there; there is never more than one current volume, and none
//! in use without its record. Every restore is also said in the journal.

use super::backup::{stamp, Backup};
use super::volume::STEP;
use super::{aws_err, Context, Master, StepError};
use crate::config::RestoreFrom;
use crate::retry::{self, Backoff};
use aws_sdk_ec2::types::{
    Filter, ResourceType, Snapshot, SnapshotState, Tag, TagSpecification, Volume, VolumeState,
    VolumeType,
};
use aws_sdk_ssm::types::ParameterType;
use sha2::{Digest, Sha256};
use std::path::Path;
use time::OffsetDateTime;

/// The AWS actions restoring calls (checked against the template's grants).
pub const CALLS: &[&str] = &[
    "ec2:DescribeVolumes",
    "ec2:DescribeSnapshots",
    "ec2:CreateSnapshot",
    "ec2:CreateVolume",
    "ec2:CreateTags",
    "ec2:DeleteTags",
    "ssm:PutParameter",
];

/// Names the cluster's current data volume (with `slipway:superseded`
/// absent), and the volumes of its EBS snapshots.
pub const DATA_TAG: &str = "slipway:etcd-data";
/// Marks a volume that is no longer the cluster's; its value is the
/// volume that replaced it.
pub const SUPERSEDED_TAG: &str = "slipway:superseded";
/// Marks a volume being restored, not yet the cluster's.
pub const RESTORING_TAG: &str = "slipway:restoring";
/// Every resource of the cluster carries it.
pub const CLUSTER_TAG: &str = "slipway:cluster";
/// The snapshot a restored volume came from, and when it was made.
pub const RESTORED_FROM_TAG: &str = "slipway:restored-from";
pub const RESTORED_AT_TAG: &str = "slipway:restored-at";
/// Marks a snapshot a restore took of a volume whose zone still answers;
/// its value is the instance that took it (a reboot of that instance
/// waits for the same snapshot rather than taking another).
pub const FRESH_FOR_TAG: &str = "slipway:fresh-for";

/// The volume this master is to attach, and how it was found.
#[derive(Debug)]
pub struct Located {
    pub volume_id: String,
    /// What the restore did, if one ran (for the step's report).
    pub restored: Option<String>,
    /// The etcd backup the volume was made empty for, when its data has
    /// yet to be restored into it (see [`fill`]).
    pub fill_from: Option<String>,
}

/// A backup a restore starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An EBS snapshot of the data volume: the new volume is made from it.
    Snapshot { id: String, taken: OffsetDateTime },
    /// An etcd backup in the secrets bucket: the new volume is made empty
    /// and etcd's data restored into it once it is mounted.
    Backup(Backup),
}

impl Source {
    /// The snapshot's ID or the backup's key: what the restored volume's
    /// `slipway:restored-from` tag holds.
    pub fn name(&self) -> &str {
        match self {
            Self::Snapshot { id, .. } => id,
            Self::Backup(b) => &b.key,
        }
    }

    fn taken(&self) -> OffsetDateTime {
        match self {
            Self::Snapshot { taken, .. } => *taken,
            Self::Backup(b) => b.taken,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Snapshot { id, taken } => {
                write!(f, "EBS snapshot {id} (taken {})", stamp(*taken))
            }
            Self::Backup(b) => write!(
                f,
                "etcd backup {} (taken {}, revision {})",
                b.key,
                stamp(b.taken),
                b.revision
            ),
        }
    }
}

/// Which backup a restore starts from, by the stack's setting: the newest
/// of either kind (an EBS snapshot on a tie: it needs no etcd restore), or
/// the preferred kind, the other only when the preferred has none.
pub fn choose(
    snapshot: Option<Source>,
    backup: Option<Source>,
    from: RestoreFrom,
) -> Option<Source> {
    match (snapshot, backup) {
        (Some(s), Some(b)) => Some(match from {
            RestoreFrom::Newest if b.taken() > s.taken() => b,
            RestoreFrom::Newest | RestoreFrom::VolumeSnapshot => s,
            RestoreFrom::EtcdBackup => b,
        }),
        (s, b) => s.or(b),
    }
}

fn tag<'a>(volume: &'a Volume, key: &str) -> Option<&'a str> {
    tag_in(volume.tags(), key)
}

/// The value of `key` among a resource's tags.
fn tag_in<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn id(volume: &Volume) -> &str {
    volume.volume_id().unwrap_or("?")
}

fn zone(volume: &Volume) -> &str {
    volume.availability_zone().unwrap_or("?")
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// The current and becoming volumes tagged `key=<cluster>`: superseded
/// and deleted ones left out.
async fn tagged_volumes(ctx: &Context, key: &str) -> Result<Vec<Volume>, StepError> {
    let mut volumes = volumes_tagged(ctx, key).await?;
    volumes.retain(|v| {
        tag(v, SUPERSEDED_TAG).is_none()
            && !matches!(
                v.state(),
                Some(VolumeState::Deleting | VolumeState::Deleted)
            )
    });
    Ok(volumes)
}

/// Every volume tagged `key=<cluster>`, as EC2 lists them.
async fn volumes_tagged(ctx: &Context, key: &str) -> Result<Vec<Volume>, StepError> {
    let cluster = &ctx.config.cluster_name;
    let mut volumes = Vec::new();
    let mut pages = ctx
        .aws
        .ec2
        .describe_volumes()
        .filters(tag_filter(key, cluster))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_err(
            "ec2:DescribeVolumes",
            format!("looking for volumes tagged {key}={cluster}"),
        ))?;
        volumes.extend(page.volumes().iter().cloned());
    }
    Ok(volumes)
}

/// What the tags say, before anything is changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Finding {
    /// The cluster's volume is in this zone: use it.
    Here(String),
    /// A restore into this zone was started: finish it. `old` is the
    /// volume it replaces, if one is still current.
    Resume { volume: String, old: Option<String> },
    /// Restore into this zone; `old` as above.
    Restore { old: Option<String> },
}

/// Decides from the current and the restoring volumes (`(id, zone)`) what
/// a master in `own_zone` does. Two current volumes are a person's
/// mistake, never this code's: refused, naming both.
pub fn decide(
    own_zone: &str,
    current: &[(String, String)],
    restoring: &[(String, String)],
) -> Result<Finding, String> {
    if current.len() > 1 {
        let list: Vec<String> = current.iter().map(|(v, z)| format!("{v} in {z}")).collect();
        return Err(format!(
            "{} volumes are tagged as the cluster's etcd data ({}); \
             tag all but one {SUPERSEDED_TAG}=<the one kept>",
            current.len(),
            list.join(", ")
        ));
    }
    let old = current.first();
    if let Some((volume, zone)) = old {
        if zone == own_zone {
            return Ok(Finding::Here(volume.clone()));
        }
    }
    let old = old.map(|(v, _)| v.clone());
    let mut here = restoring.iter().filter(|(_, z)| z == own_zone);
    Ok(match here.next() {
        Some((volume, _)) => Finding::Resume {
            volume: volume.clone(),
            old,
        },
        None => Finding::Restore { old },
    })
}

/// The cluster's data volume for a master in this instance's zone,
/// restoring one when the current volume is elsewhere or gone.
pub async fn locate(ctx: &Master<'_>) -> Result<Located, StepError> {
    let own_zone = ctx.instance.availability_zone.as_str();
    let pairs = |vs: &[Volume]| -> Vec<(String, String)> {
        vs.iter()
            .map(|v| (id(v).to_owned(), zone(v).to_owned()))
            .collect()
    };
    let current = tagged_volumes(ctx, DATA_TAG).await?;
    let restoring = tagged_volumes(ctx, RESTORING_TAG).await?;
    let finding = decide(own_zone, &pairs(&current), &pairs(&restoring)).map_err(|message| {
        StepError::Refused {
            what: STEP.into(),
            message,
        }
    })?;
    let (volume, old, resumed, from) = match finding {
        Finding::Here(volume_id) => {
            let fill_from = current
                .iter()
                .find(|v| id(v) == volume_id)
                .and_then(|v| backup_restored_from(ctx, v));
            return Ok(Located {
                volume_id,
                restored: None,
                fill_from,
            });
        }
        Finding::Resume { volume, old } => {
            let from = restoring
                .iter()
                .find(|v| id(v) == volume)
                .and_then(|v| tag(v, RESTORED_FROM_TAG).or(v.snapshot_id()))
                .unwrap_or("?")
                .to_owned();
            (volume, old, true, from)
        }
        Finding::Restore { old } => {
            let where_old = current.first().map_or_else(
                || "no volume is tagged as the cluster's".to_owned(),
                |v| format!("the cluster's volume {} is in {}", id(v), zone(v)),
            );
            let from = ctx.settings.restore_from;
            let fresh = match current.first() {
                Some(v) if from != RestoreFrom::EtcdBackup => fresh_snapshot(ctx, v).await?,
                _ => None,
            };
            let snapshot = match fresh {
                Some(s) => Some(s),
                None => newest_snapshot(ctx).await?,
            };
            let backup = super::backup::list(ctx).await?.pop().map(Source::Backup);
            let source = choose(snapshot.as_ref().and_then(snapshot_source), backup, from)
                .ok_or_else(|| StepError::Refused {
                    what: STEP.into(),
                    message: format!(
                        "{where_old}, this master in {own_zone}, and neither a completed EBS \
                         snapshot tagged {DATA_TAG}={cluster} nor an etcd backup under \
                         s3://{bucket}/{prefix} exists to restore from",
                        cluster = ctx.config.cluster_name,
                        bucket = ctx.config.secrets_bucket,
                        prefix = super::backup::prefix(&ctx.config.cluster_name),
                    ),
                })?;
            tracing::warn!(
                step = STEP,
                "{where_old}, this master in {own_zone}: restoring etcd's volume from {source}"
            );
            // An empty volume for an etcd backup is as large as the one it
            // replaces (or the snapshot's volume, or the template's default).
            let size = current
                .first()
                .and_then(Volume::size)
                .or(snapshot.as_ref().and_then(Snapshot::volume_size))
                .unwrap_or(DEFAULT_VOLUME_GIB);
            let volume = create(ctx, &source, size, old.as_deref()).await?;
            (volume, old, false, source.name().to_owned())
        }
    };
    complete(ctx, &volume, old.as_deref(), resumed, &from).await
}

/// etcd's data directory on the data volume (its static pod's
/// `--data-dir`, below the volume's mount).
pub const ETCD_DATA_DIR: &str = "data";
/// Where a restore from an etcd backup puts the backup and builds the data
/// directory, on the volume, before the directory takes its name.
const BACKUP_FILE: &str = "slipway-restore.db";
const STAGING_DIR: &str = "data.restoring";
/// Raised past any revision a client of the old cluster saw, with the
/// history below it marked compacted, so every watch starts over (as
/// etcd's guide to restoring a Kubernetes cluster advises).
const BUMP_REVISION: &str = "1000000000";

/// The last step of a restore from an etcd backup, once the empty volume
/// is mounted at `mount`: the backup fetched (refused unless its bytes
/// match the sha256 stored with it), restored with etcdutl (taken from
/// etcd's own image) into a staging directory as a one-member cluster at
/// this master's address, which then becomes etcd's data directory in one
/// rename. Does nothing once the data directory exists; a boot cut short
/// starts the staging over. `None` when there was nothing to do.
pub async fn fill(ctx: &Master<'_>, mount: &Path, key: &str) -> Result<Option<String>, StepError> {
    let data = mount.join(ETCD_DATA_DIR);
    if data.exists() {
        return Ok(None);
    }
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| StepError::Invalid {
            what: what.clone(),
            message: e.to_string(),
        }
    };
    let staging = mount.join(STAGING_DIR);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    let file = mount.join(BACKUP_FILE);
    let backup = super::backup::fetch(ctx, key, &file).await?;
    std::fs::create_dir_all(&ctx.paths.run).map_err(io(&ctx.paths.run))?;
    let etcdutl = ctx.paths.run.join("etcdutl");
    super::images::extract(&ctx.paths.images, "etcd", ETCDUTL_IN_IMAGE, &etcdutl)?;
    let ip = ctx.ip;
    let name = crate::render::master_node_name(ip);
    let peer = format!("https://{ip}:2380");
    ctx.runner.run(
        &etcdutl.to_string_lossy(),
        &[
            "snapshot",
            "restore",
            &file.to_string_lossy(),
            "--data-dir",
            &staging.to_string_lossy(),
            "--name",
            &name,
            "--initial-cluster",
            &format!("{name}={peer}"),
            "--initial-advertise-peer-urls",
            &peer,
            "--bump-revision",
            BUMP_REVISION,
            "--mark-compacted",
        ],
    )?;
    std::fs::rename(&staging, &data).map_err(io(&data))?;
    std::fs::File::open(mount)
        .and_then(|d| d.sync_all())
        .map_err(io(mount))?;
    std::fs::remove_file(&file).map_err(io(&file))?;
    let what = format!(
        "restored etcd's data from {key} (taken {}, revision {}, {} bytes, sha256 checked) \
         into {}",
        stamp(backup.taken),
        backup.revision,
        backup.size,
        data.display()
    );
    tracing::warn!(step = STEP, "{what}");
    Ok(Some(what))
}

/// Where etcd's image (upstream's, and the fixtures') keeps etcdutl.
const ETCDUTL_IN_IMAGE: &str = "/usr/local/bin/etcdutl";

/// The size of an empty volume when nothing says otherwise: the
/// template's `MasterVolumeSize` default.
pub const DEFAULT_VOLUME_GIB: i32 = 20;

fn snapshot_source(s: &Snapshot) -> Option<Source> {
    let taken = s.start_time()?;
    Some(Source::Snapshot {
        id: s.snapshot_id()?.to_owned(),
        taken: OffsetDateTime::from_unix_timestamp(taken.secs()).ok()?,
    })
}

/// The etcd backup `volume` was made empty for, if it was.
fn backup_restored_from(ctx: &Context, volume: &Volume) -> Option<String> {
    let from = tag(volume, RESTORED_FROM_TAG)?;
    Backup::from_key(&ctx.config.cluster_name, from, 0).map(|b| b.key)
}

/// Steps 2 to 4 of a restore whose volume exists: once it is available,
/// the restore is recorded, the old volume (if any) superseded and the
/// cluster's tag moved.
async fn complete(
    ctx: &Context,
    volume: &str,
    old: Option<&str>,
    resumed: bool,
    from: &str,
) -> Result<Located, StepError> {
    let made = wait_available(ctx, volume).await?;
    // Recorded before the volume becomes the cluster's: none is in use
    // without its record. A resumed restore records itself again.
    record(ctx, &made, old, resumed, from).await?;
    if let Some(old) = old {
        set_tag(ctx, old, SUPERSEDED_TAG, volume).await?;
        // Off Data Lifecycle Manager's target too: its snapshots from now
        // on would hold data the cluster has moved on from.
        clear_tag(ctx, old, DATA_TAG).await?;
    }
    set_tag(ctx, volume, DATA_TAG, &ctx.config.cluster_name).await?;
    clear_tag(ctx, volume, RESTORING_TAG).await?;
    let what = format!(
        "{} {volume} in {} from {from}{}",
        if resumed {
            "finished restoring"
        } else {
            "restored"
        },
        ctx.instance.availability_zone,
        old.map_or_else(String::new, |o| format!(", superseding {o}"))
    );
    tracing::warn!(step = STEP, "{what}");
    Ok(Located {
        volume_id: volume.to_owned(),
        restored: Some(what),
        fill_from: backup_restored_from(ctx, &made),
    })
}

/// The SSM parameter that records the cluster's restores: each restore
/// writes a new version, so its history is the audit trail. The template
/// creates it and grants the master `ssm:PutParameter` on it alone.
pub fn record_name(cluster: &str) -> String {
    format!("/slipway/{cluster}/etcd-restore")
}

/// What a restore's record says: JSON, one object, `origin`'s fields
/// (what it was restored from) among them.
fn record_text(
    ctx: &Context,
    volume: &Volume,
    old: Option<&str>,
    resumed: bool,
    origin: serde_json::Value,
) -> String {
    let mut record = serde_json::json!({
        "volume": id(volume),
        "zone": zone(volume),
        "superseded": old,
        "restored_at": tag(volume, RESTORED_AT_TAG),
        "resumed": resumed,
        "instance": ctx.instance.id,
    });
    if let (Some(record), serde_json::Value::Object(origin)) = (record.as_object_mut(), origin) {
        record.extend(origin);
    }
    record.to_string()
}

/// A backup as a restore's record names it; `snapshot_of` is the volume
/// an EBS snapshot was taken of.
fn origin(source: &Source, snapshot_of: Option<&str>) -> serde_json::Value {
    match source {
        Source::Snapshot { id, taken } => serde_json::json!({
            "snapshot": id,
            "snapshot_taken": stamp(*taken),
            "snapshot_of": snapshot_of,
        }),
        Source::Backup(b) => serde_json::json!({
            "backup": b.key,
            "backup_taken": stamp(b.taken),
            "revision": b.revision,
        }),
    }
}

/// Writes the restore's record (see [`record_name`]) and says it in the
/// journal. `from` is the snapshot's ID or the backup's key.
async fn record(
    ctx: &Context,
    volume: &Volume,
    old: Option<&str>,
    resumed: bool,
    from: &str,
) -> Result<(), StepError> {
    let origin = match Backup::from_key(&ctx.config.cluster_name, from, 0) {
        Some(backup) => origin(&Source::Backup(backup), None),
        None => {
            let snapshot = snapshots(ctx)
                .await?
                .into_iter()
                .find(|s| s.snapshot_id() == Some(from));
            match snapshot
                .as_ref()
                .and_then(|s| Some((snapshot_source(s)?, s)))
            {
                Some((source, s)) => origin(&source, s.volume_id()),
                // Deleted since (a resumed restore, retention in between):
                // the record names it all the same.
                None => serde_json::json!({ "snapshot": from }),
            }
        }
    };
    let text = record_text(ctx, volume, old, resumed, origin);
    let name = record_name(&ctx.config.cluster_name);
    ctx.aws
        .ssm
        .put_parameter()
        .name(&name)
        .value(&text)
        .r#type(ParameterType::String)
        .overwrite(true)
        .send()
        .await
        .map_err(aws_err(
            "ssm:PutParameter",
            format!("recording the restore of {} in {name}", id(volume)),
        ))?;
    tracing::info!(step = STEP, "recorded in {name}: {text}");
    Ok(())
}

/// The cluster's EBS snapshots (those tagged as its etcd data), in any
/// state, oldest first.
pub async fn snapshots(ctx: &Context) -> Result<Vec<Snapshot>, StepError> {
    let cluster = &ctx.config.cluster_name;
    let mut all = Vec::new();
    let mut pages = ctx
        .aws
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(tag_filter(DATA_TAG, cluster))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_err(
            "ec2:DescribeSnapshots",
            format!("looking for snapshots tagged {DATA_TAG}={cluster}"),
        ))?;
        all.extend(page.snapshots().iter().cloned());
    }
    all.sort_by(|a, b| (a.start_time(), a.snapshot_id()).cmp(&(b.start_time(), b.snapshot_id())));
    Ok(all)
}

/// The newest completed snapshot: what a restore at boot uses.
fn newest(snapshots: &[Snapshot]) -> Option<&Snapshot> {
    snapshots
        .iter()
        .rev()
        .find(|s| s.state() == Some(&SnapshotState::Completed))
}

async fn newest_snapshot(ctx: &Context) -> Result<Option<Snapshot>, StepError> {
    Ok(newest(&snapshots(ctx).await?).cloned())
}

/// A completed snapshot of `old` taken now, when its zone still answers:
/// the volume is `available`, so its master is gone and nothing writes to
/// it, and a snapshot of it loses nothing. `None` when the volume is in
/// any other state (attached to a master that may be dead, or impaired:
/// the zone may be down), or when the snapshot fails or is not completed
/// within the `snapshot` deadline; the restore then falls back to the
/// newest backup, and a pending snapshot finishes on its own.
async fn fresh_snapshot(ctx: &Context, old: &Volume) -> Result<Option<Snapshot>, StepError> {
    if old.state() != Some(&VolumeState::Available) {
        return Ok(None);
    }
    let volume = id(old);
    let instance = &ctx.instance.id;
    let taken = snapshots(ctx).await?.into_iter().rev().find(|s| {
        s.volume_id() == Some(volume)
            && tag_in(s.tags(), FRESH_FOR_TAG) == Some(instance.as_str())
            && matches!(
                s.state(),
                Some(SnapshotState::Pending | SnapshotState::Completed)
            )
    });
    let snapshot = match taken {
        Some(s) => s.snapshot_id().unwrap_or("?").to_owned(),
        None => take_snapshot(ctx, volume).await?,
    };
    tracing::warn!(
        step = STEP,
        "{volume} in {} is available, its zone answering: restoring from a fresh snapshot \
         of it, {snapshot}",
        zone(old)
    );
    let waited = retry::until(
        &format!("{snapshot} of {volume} to complete"),
        Backoff::new(ctx.deadlines.snapshot),
        || async {
            let described = ctx
                .aws
                .ec2
                .describe_snapshots()
                .snapshot_ids(&snapshot)
                .send()
                .await
                .map_err(aws_err(
                    "ec2:DescribeSnapshots",
                    format!("looking up {snapshot}"),
                ))?;
            let found = described.snapshots().first();
            match found.and_then(Snapshot::state) {
                Some(SnapshotState::Completed) => Ok(found.cloned().map(Ok)),
                Some(SnapshotState::Error) => Ok(Some(Err(format!(
                    "{snapshot} failed ({})",
                    found
                        .and_then(Snapshot::state_message)
                        .unwrap_or("no reason given")
                )))),
                _ => Ok(None),
            }
        },
    )
    .await;
    let why = match waited {
        Ok(Ok(done)) => return Ok(Some(done)),
        Ok(Err(why)) => why,
        Err(retry::WaitError::Failed { source, .. }) => return Err(source),
        Err(deadline) => deadline.to_string(),
    };
    tracing::warn!(
        step = STEP,
        "the fresh snapshot is not usable ({why}): restoring from the newest backup instead"
    );
    Ok(None)
}

/// Starts an EBS snapshot of the cluster's `volume`, tagged as the
/// cluster's etcd data (so restores and `--list` see it) and as taken by
/// this instance.
async fn take_snapshot(ctx: &Context, volume: &str) -> Result<String, StepError> {
    let cluster = &ctx.config.cluster_name;
    let t = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let taken = ctx
        .aws
        .ec2
        .create_snapshot()
        .volume_id(volume)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Snapshot)
                .tags(t("Name", &format!("{cluster}-etcd-fresh")))
                .tags(t(CLUSTER_TAG, cluster))
                .tags(t(DATA_TAG, cluster))
                .tags(t(FRESH_FOR_TAG, &ctx.instance.id))
                .build(),
        )
        .send()
        .await
        .map_err(aws_err(
            "ec2:CreateSnapshot",
            format!("snapshotting {volume} before restoring from it"),
        ))?;
    taken
        .snapshot_id()
        .map(str::to_owned)
        .ok_or_else(|| StepError::Refused {
            what: STEP.into(),
            message: format!("EC2 started a snapshot of {volume} but named none"),
        })
}

/// Every volume that is, was or is becoming the cluster's etcd data.
pub async fn volumes(ctx: &Context) -> Result<Vec<Volume>, StepError> {
    let mut all = volumes_tagged(ctx, CLUSTER_TAG).await?;
    all.retain(|v| {
        [DATA_TAG, RESTORING_TAG, SUPERSEDED_TAG]
            .iter()
            .any(|k| tag(v, k).is_some())
    });
    all.sort_by(|a, b| a.create_time().cmp(&b.create_time()));
    Ok(all)
}

fn when(t: Option<&aws_sdk_ec2::primitives::DateTime>) -> String {
    t.map_or_else(|| "?".to_owned(), ToString::to_string)
}

/// What `slipway-init restore --list` prints: the volumes, then the
/// snapshots, oldest first, the one a restore at boot would use marked.
pub fn table(volumes: &[Volume], snapshots: &[Snapshot]) -> String {
    let mut out = String::from("volume                 zone         state      role\n");
    for v in volumes {
        let role = match (tag(v, SUPERSEDED_TAG), tag(v, RESTORING_TAG)) {
            (Some(by), _) => format!("superseded by {by}"),
            (None, Some(_)) => "being restored".to_owned(),
            (None, None) => "the cluster's etcd data".to_owned(),
        };
        let from = tag(v, RESTORED_FROM_TAG).map_or_else(String::new, |s| {
            format!(
                " (restored from {s} at {})",
                tag(v, RESTORED_AT_TAG).unwrap_or("?")
            )
        });
        out.push_str(&format!(
            "{:<22} {:<12} {:<10} {role}{from}\n",
            id(v),
            zone(v),
            v.state().map_or("?", |s| s.as_str()),
        ));
    }
    if volumes.is_empty() {
        out.push_str("(none)\n");
    }
    out.push_str("\nsnapshot                taken (UTC)           state      of volume\n");
    let chosen = newest(snapshots).and_then(|s| s.snapshot_id());
    for s in snapshots {
        let mark = if s.snapshot_id() == chosen {
            "  <- newest completed"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<23} {:<21} {:<10} {}{mark}\n",
            s.snapshot_id().unwrap_or("?"),
            when(s.start_time()),
            s.state().map_or("?", |x| x.as_str()),
            s.volume_id().unwrap_or("?"),
        ));
    }
    if snapshots.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

/// The backup a person named: a snapshot ID (`snap-…`), which must be a
/// completed snapshot of this cluster's volume, or the key of one of this
/// cluster's etcd backups. Also the volume a snapshot was taken of.
async fn named_source(ctx: &Context, name: &str) -> Result<(Source, Option<String>), StepError> {
    let cluster = &ctx.config.cluster_name;
    let refuse = |message: String| StepError::Refused {
        what: "restore".into(),
        message,
    };
    if !name.starts_with("snap-") {
        let known = Backup::from_key(cluster, name, 0).ok_or_else(|| {
            refuse(format!(
                "{name} is neither a snapshot ID nor the key of one of this cluster's etcd \
                 backups (under {})",
                super::backup::prefix(cluster)
            ))
        })?;
        let listed = super::backup::list(ctx).await?;
        let backup = listed
            .into_iter()
            .find(|b| b.key == known.key)
            .ok_or_else(|| refuse(format!("no etcd backup {name} is in the bucket")))?;
        return Ok((Source::Backup(backup), None));
    }
    let described = ctx
        .aws
        .ec2
        .describe_snapshots()
        .snapshot_ids(name)
        .send()
        .await
        .map_err(aws_err(
            "ec2:DescribeSnapshots",
            format!("looking up {name}"),
        ))?;
    let snapshot = described
        .snapshots()
        .first()
        .ok_or_else(|| refuse(format!("{name} does not exist")))?;
    if snapshot
        .tags()
        .iter()
        .all(|t| t.key() != Some(DATA_TAG) || t.value() != Some(cluster.as_str()))
    {
        return Err(refuse(format!(
            "{name} is not tagged {DATA_TAG}={cluster}: not a snapshot of this \
             cluster's etcd volume"
        )));
    }
    if snapshot.state() != Some(&SnapshotState::Completed) {
        return Err(refuse(format!(
            "{name} is {}, not completed",
            snapshot.state().map_or("?", |s| s.as_str())
        )));
    }
    let source = snapshot_source(snapshot)
        .ok_or_else(|| refuse(format!("EC2 gives {name} no start time")))?;
    Ok((source, snapshot.volume_id().map(str::to_owned)))
}

/// A person's restore of the named snapshot or etcd backup into this
/// master's zone: the same steps as a restore at boot, for rolling the
/// cluster back. Without `apply`, says what it would do and changes
/// nothing. The running master keeps its volume until its next boot.
pub async fn restore_named(ctx: &Context, name: &str, apply: bool) -> Result<String, StepError> {
    let refuse = |message: String| StepError::Refused {
        what: "restore".into(),
        message,
    };
    let (source, snapshot_of) = named_source(ctx, name).await?;
    let current = tagged_volumes(ctx, DATA_TAG).await?;
    if current.len() > 1 {
        let list: Vec<String> = current
            .iter()
            .map(|v| format!("{} in {}", id(v), zone(v)))
            .collect();
        return Err(refuse(format!(
            "{} volumes are tagged as the cluster's etcd data ({}); settle that first",
            current.len(),
            list.join(", ")
        )));
    }
    let old = current.first().map(|v| id(v).to_owned());
    let zone = &ctx.instance.availability_zone;
    let plan = format!(
        "a volume in {zone} from {source}{} becomes the cluster's etcd data{}",
        snapshot_of.map_or_else(String::new, |v| format!(" of {v}")),
        old.as_deref()
            .map_or_else(String::new, |o| format!(", superseding {o}")),
    );
    if !apply {
        return Ok(format!(
            "would restore: {plan}; nothing changed (run again with --yes to restore)"
        ));
    }
    tracing::warn!(step = "restore", "restoring by request: {plan}");
    let size = current
        .first()
        .and_then(Volume::size)
        .unwrap_or(DEFAULT_VOLUME_GIB);
    let volume = create(ctx, &source, size, old.as_deref()).await?;
    let done = complete(ctx, &volume, old.as_deref(), false, source.name()).await?;
    Ok(format!(
        "{}; this master still runs on its old volume until its next boot: reboot {} or \
         terminate it (its Auto Scaling group then launches a master that attaches {volume})",
        done.restored.unwrap_or_default(),
        ctx.instance.id
    ))
}

/// A client token for the restore of `snapshot` into `zone` in place of
/// `old` (EC2 takes up to 64 ASCII characters): a retried create returns
/// the same volume, and a later restore from the same snapshot, once the
/// cluster has moved on from `old`, makes a new one.
pub fn client_token(cluster: &str, zone: &str, snapshot: &str, old: Option<&str>) -> String {
    let old = old.unwrap_or("-");
    let digest = Sha256::digest(format!("{cluster}\n{zone}\n{snapshot}\n{old}"));
    format!("slipway-restore-{}", &hex::encode(digest)[..40])
}

/// Step 1: the new volume in this master's zone, from the snapshot or
/// (for an etcd backup) empty and `size_gib` large.
async fn create(
    ctx: &Context,
    source: &Source,
    size_gib: i32,
    old: Option<&str>,
) -> Result<String, StepError> {
    let cluster = &ctx.config.cluster_name;
    let zone = &ctx.instance.availability_zone;
    let from = source.name();
    let t = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let request = ctx
        .aws
        .ec2
        .create_volume()
        .availability_zone(zone)
        .volume_type(VolumeType::Gp3)
        .encrypted(true)
        .client_token(client_token(cluster, zone, from, old))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                // (No spaces: the local AWS checks signatures over a body
                // it re-encodes, and spaces in a tag's value fail that.)
                .tags(t("Name", &format!("{cluster}-etcd-restored")))
                .tags(t(CLUSTER_TAG, cluster))
                .tags(t(RESTORING_TAG, cluster))
                .tags(t(RESTORED_FROM_TAG, from))
                .tags(t(RESTORED_AT_TAG, &stamp(OffsetDateTime::now_utc())))
                .build(),
        );
    let request = match source {
        Source::Snapshot { id, .. } => request.snapshot_id(id),
        Source::Backup(_) => request.size(size_gib),
    };
    let created = request.send().await.map_err(aws_err(
        "ec2:CreateVolume",
        format!("creating a volume in {zone} for {from}"),
    ))?;
    created
        .volume_id()
        .map(str::to_owned)
        .ok_or_else(|| StepError::Refused {
            what: STEP.into(),
            message: format!("EC2 created a volume for {from} but named none"),
        })
}

async fn wait_available(ctx: &Context, volume: &str) -> Result<Volume, StepError> {
    retry::until(
        &format!("{volume} to become available"),
        Backoff::new(ctx.deadlines.volume_available),
        || async {
            let described = ctx
                .aws
                .ec2
                .describe_volumes()
                .volume_ids(volume)
                .send()
                .await
                .map_err(aws_err(
                    "ec2:DescribeVolumes",
                    format!("looking up {volume}"),
                ))?;
            let found = described.volumes().first();
            match found.and_then(|v| v.state()) {
                Some(VolumeState::Available | VolumeState::InUse) => Ok(found.cloned()),
                Some(VolumeState::Error) => Err(StepError::Refused {
                    what: STEP.into(),
                    message: format!("{volume} failed to create (state error)"),
                }),
                _ => Ok(None),
            }
        },
    )
    .await
    .map_err(|e| match e {
        retry::WaitError::Failed { source, .. } => source,
        deadline => StepError::Wait(deadline.to_string()),
    })
}

async fn set_tag(ctx: &Context, volume: &str, key: &str, value: &str) -> Result<(), StepError> {
    ctx.aws
        .ec2
        .create_tags()
        .resources(volume)
        .tags(Tag::builder().key(key).value(value).build())
        .send()
        .await
        .map_err(aws_err(
            "ec2:CreateTags",
            format!("tagging {volume} {key}={value}"),
        ))?;
    Ok(())
}

async fn clear_tag(ctx: &Context, volume: &str, key: &str) -> Result<(), StepError> {
    ctx.aws
        .ec2
        .delete_tags()
        .resources(volume)
        .tags(Tag::builder().key(key).build())
        .send()
        .await
        .map_err(aws_err(
            "ec2:DeleteTags",
            format!("removing {key} from {volume}"),
        ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: &str, zone: &str) -> (String, String) {
        (id.to_owned(), zone.to_owned())
    }

    #[test]
    fn the_newest_backup_or_the_preferred_kind_is_chosen() {
        let at = |minute: i64| OffsetDateTime::UNIX_EPOCH + time::Duration::minutes(minute);
        let snap = |minute| Source::Snapshot {
            id: "snap-1".into(),
            taken: at(minute),
        };
        let backup = |minute| {
            Source::Backup(Backup {
                key: "demo/etcd-backups/x.db".into(),
                taken: at(minute),
                revision: 1,
                size: 1,
            })
        };
        use RestoreFrom::*;
        let cases = [
            // (snapshot at, backup at, setting, backup chosen?)
            (Some(10), Some(20), Newest, Some(true)),
            (Some(20), Some(10), Newest, Some(false)),
            (Some(10), Some(10), Newest, Some(false)),
            (Some(10), Some(20), VolumeSnapshot, Some(false)),
            (Some(20), Some(10), EtcdBackup, Some(true)),
            // The preferred kind missing: the other.
            (None, Some(10), VolumeSnapshot, Some(true)),
            (Some(10), None, EtcdBackup, Some(false)),
            (None, None, Newest, None),
        ];
        for (s, b, from, backup_chosen) in cases {
            let chosen = choose(s.map(snap), b.map(backup), from);
            assert_eq!(
                chosen.map(|c| matches!(c, Source::Backup(_))),
                backup_chosen,
                "{s:?} {b:?} {from:?}"
            );
        }
    }

    #[test]
    fn the_volume_in_this_zone_is_used_whatever_else_exists() {
        assert_eq!(
            decide("a", &[v("vol-1", "a")], &[v("vol-2", "a")]),
            Ok(Finding::Here("vol-1".into()))
        );
    }

    #[test]
    fn a_volume_elsewhere_or_none_is_restored_and_a_started_restore_resumed() {
        assert_eq!(
            decide("b", &[v("vol-1", "a")], &[]),
            Ok(Finding::Restore {
                old: Some("vol-1".into())
            })
        );
        assert_eq!(decide("b", &[], &[]), Ok(Finding::Restore { old: None }));
        // A restore in another zone is not this master's to finish.
        assert_eq!(
            decide("b", &[v("vol-1", "a")], &[v("vol-3", "c"), v("vol-2", "b")]),
            Ok(Finding::Resume {
                volume: "vol-2".into(),
                old: Some("vol-1".into())
            })
        );
        // Stopped after superseding the old volume: only the new is left.
        assert_eq!(
            decide("b", &[], &[v("vol-2", "b")]),
            Ok(Finding::Resume {
                volume: "vol-2".into(),
                old: None
            })
        );
    }

    #[test]
    fn two_current_volumes_are_refused_by_name() {
        let err = decide("a", &[v("vol-1", "a"), v("vol-2", "b")], &[]).unwrap_err();
        assert!(
            err.contains("vol-1 in a") && err.contains("vol-2 in b"),
            "{err}"
        );
    }

    #[test]
    fn the_client_token_is_stable_per_restore_and_fits_ec2s_limit() {
        let t = client_token("demo", "us-east-1b", "snap-1", Some("vol-1"));
        assert_eq!(
            t,
            client_token("demo", "us-east-1b", "snap-1", Some("vol-1"))
        );
        assert_ne!(
            t,
            client_token("demo", "us-east-1c", "snap-1", Some("vol-1"))
        );
        assert_ne!(
            t,
            client_token("demo", "us-east-1b", "snap-2", Some("vol-1"))
        );
        assert_ne!(
            t,
            client_token("demo", "us-east-1b", "snap-1", Some("vol-2"))
        );
        assert_ne!(t, client_token("demo", "us-east-1b", "snap-1", None));
        assert!(t.len() <= 64 && t.is_ascii(), "{t}");
    }
}
