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
//! A boot that stops anywhere finds, next time, either the new volume as
//! the cluster's or its `slipway:restoring` volume in its zone, and goes
//! on from there; there is never more than one current volume, and none
//! in use without its record. Every restore is also said in the journal.

use super::volume::STEP;
use super::{aws_err, Context, StepError};
use crate::retry::{self, Backoff};
use aws_sdk_ec2::types::{
    Filter, ResourceType, Snapshot, SnapshotState, Tag, TagSpecification, Volume, VolumeState,
    VolumeType,
};
use aws_sdk_ssm::types::ParameterType;
use sha2::{Digest, Sha256};

/// The AWS actions restoring calls (checked against the template's grants).
pub const CALLS: &[&str] = &[
    "ec2:DescribeVolumes",
    "ec2:DescribeSnapshots",
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

/// The volume this master is to attach, and how it was found.
#[derive(Debug)]
pub struct Located {
    pub volume_id: String,
    /// What the restore did, if one ran (for the step's report).
    pub restored: Option<String>,
}

fn tag<'a>(volume: &'a Volume, key: &str) -> Option<&'a str> {
    volume
        .tags()
        .iter()
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
pub async fn locate(ctx: &Context) -> Result<Located, StepError> {
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
            return Ok(Located {
                volume_id,
                restored: None,
            })
        }
        Finding::Resume { volume, old } => {
            let from = restoring
                .iter()
                .find(|v| id(v) == volume)
                .and_then(|v| v.snapshot_id())
                .unwrap_or("?")
                .to_owned();
            (volume, old, true, from)
        }
        Finding::Restore { old } => {
            let where_old = current.first().map_or_else(
                || "no volume is tagged as the cluster's".to_owned(),
                |v| format!("the cluster's volume {} is in {}", id(v), zone(v)),
            );
            let snapshot = newest_snapshot(ctx)
                .await?
                .ok_or_else(|| StepError::Refused {
                    what: STEP.into(),
                    message: format!(
                        "{where_old}, this master in {own_zone}, and no completed EBS snapshot \
                     tagged {DATA_TAG}={} exists to restore from",
                        ctx.config.cluster_name
                    ),
                })?;
            let snapshot_id = snapshot.snapshot_id().unwrap_or("?").to_owned();
            tracing::warn!(
                step = STEP,
                "{where_old}, this master in {own_zone}: restoring etcd's volume from \
                 {snapshot_id}, taken {} of {}",
                snapshot
                    .start_time()
                    .map_or_else(|| "?".to_owned(), |t| t.to_string()),
                snapshot.volume_id().unwrap_or("?")
            );
            let volume = create(ctx, &snapshot_id, old.as_deref()).await?;
            (volume, old, false, snapshot_id)
        }
    };
    complete(ctx, &volume, old.as_deref(), resumed, &from).await
}

/// Steps 2 and 3 of a restore whose volume exists: once it is available,
/// the old volume (if any) is superseded and the cluster's tag moved.
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
    })
}

/// The SSM parameter that records the cluster's restores: each restore
/// writes a new version, so its history is the audit trail. The template
/// creates it and grants the master `ssm:PutParameter` on it alone.
pub fn record_name(cluster: &str) -> String {
    format!("/slipway/{cluster}/etcd-restore")
}

/// What a restore's record says: JSON, one object.
pub fn record_text(
    ctx: &Context,
    volume: &Volume,
    old: Option<&str>,
    resumed: bool,
    snapshot: Option<&Snapshot>,
) -> String {
    serde_json::json!({
        "volume": id(volume),
        "zone": zone(volume),
        "superseded": old,
        "restored_at": tag(volume, RESTORED_AT_TAG),
        "resumed": resumed,
        "instance": ctx.instance.id,
        "snapshot": volume.snapshot_id(),
        "snapshot_taken": snapshot.and_then(|s| s.start_time()).map(ToString::to_string),
        "snapshot_of": snapshot.and_then(|s| s.volume_id()),
    })
    .to_string()
}

/// Writes the restore's record (see [`record_name`]) and says it in the
/// journal.
async fn record(
    ctx: &Context,
    volume: &Volume,
    old: Option<&str>,
    resumed: bool,
    from: &str,
) -> Result<(), StepError> {
    let snapshots = snapshots(ctx).await?;
    let snapshot = snapshots.iter().find(|s| s.snapshot_id() == Some(from));
    let text = record_text(ctx, volume, old, resumed, snapshot);
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

/// A person's restore of the named snapshot into this master's zone: the
/// same steps as a restore at boot, for rolling the cluster back. Without
/// `apply`, says what it would do and changes nothing. The running master
/// keeps its volume until it is replaced; its replacement attaches the
/// restored one.
pub async fn restore_named(
    ctx: &Context,
    snapshot_id: &str,
    apply: bool,
) -> Result<String, StepError> {
    let cluster = &ctx.config.cluster_name;
    let refuse = |message: String| StepError::Refused {
        what: "restore".into(),
        message,
    };
    let described = ctx
        .aws
        .ec2
        .describe_snapshots()
        .snapshot_ids(snapshot_id)
        .send()
        .await
        .map_err(aws_err(
            "ec2:DescribeSnapshots",
            format!("looking up {snapshot_id}"),
        ))?;
    let snapshot = described
        .snapshots()
        .first()
        .ok_or_else(|| refuse(format!("{snapshot_id} does not exist")))?;
    if snapshot
        .tags()
        .iter()
        .all(|t| t.key() != Some(DATA_TAG) || t.value() != Some(cluster.as_str()))
    {
        return Err(refuse(format!(
            "{snapshot_id} is not tagged {DATA_TAG}={cluster}: not a snapshot of this \
             cluster's etcd volume"
        )));
    }
    if snapshot.state() != Some(&SnapshotState::Completed) {
        return Err(refuse(format!(
            "{snapshot_id} is {}, not completed",
            snapshot.state().map_or("?", |s| s.as_str())
        )));
    }
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
        "a volume in {zone} from {snapshot_id} (taken {}, of {}) becomes the cluster's etcd \
         data{}",
        when(snapshot.start_time()),
        snapshot.volume_id().unwrap_or("?"),
        old.as_deref()
            .map_or_else(String::new, |o| format!(", superseding {o}")),
    );
    if !apply {
        return Ok(format!(
            "would restore: {plan}; nothing changed (run again with --yes to restore)"
        ));
    }
    tracing::warn!(step = "restore", "restoring by request: {plan}");
    let volume = create(ctx, snapshot_id, old.as_deref()).await?;
    let done = complete(ctx, &volume, old.as_deref(), false, snapshot_id).await?;
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

async fn create(ctx: &Context, snapshot: &str, old: Option<&str>) -> Result<String, StepError> {
    let cluster = &ctx.config.cluster_name;
    let zone = &ctx.instance.availability_zone;
    let t = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    let created = ctx
        .aws
        .ec2
        .create_volume()
        .availability_zone(zone)
        .snapshot_id(snapshot)
        .volume_type(VolumeType::Gp3)
        .encrypted(true)
        .client_token(client_token(cluster, zone, snapshot, old))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                // (No spaces: the local AWS checks signatures over a body
                // it re-encodes, and spaces in a tag's value fail that.)
                .tags(t("Name", &format!("{cluster}-etcd-restored")))
                .tags(t(CLUSTER_TAG, cluster))
                .tags(t(RESTORING_TAG, cluster))
                .tags(t(RESTORED_FROM_TAG, snapshot))
                .tags(t(
                    RESTORED_AT_TAG,
                    &super::backup::stamp(time::OffsetDateTime::now_utc()),
                ))
                .build(),
        )
        .send()
        .await
        .map_err(aws_err(
            "ec2:CreateVolume",
            format!("creating a volume in {zone} from {snapshot}"),
        ))?;
    created
        .volume_id()
        .map(str::to_owned)
        .ok_or_else(|| StepError::Refused {
            what: STEP.into(),
            message: format!("EC2 created a volume from {snapshot} but named none"),
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
