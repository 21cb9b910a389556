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
//! 2. the old volume is tagged `slipway:superseded=<new volume>` and
//!    loses `slipway:etcd-data`, so Data Lifecycle Manager stops
//!    snapshotting it (it is never deleted: a person decides);
//! 3. the new volume is tagged `slipway:etcd-data=<cluster>` and loses
//!    `slipway:restoring`.
//!
//! A boot that stops anywhere finds, next time, either the new volume as
//! the cluster's or its `slipway:restoring` volume in its zone, and goes
//! on from there; there is never more than one current volume. Every
//! restore is said in the journal: which snapshot, taken when, of which
//! volume.

use super::volume::STEP;
use super::{aws_err, Context, StepError};
use crate::retry::{self, Backoff};
use aws_sdk_ec2::types::{
    Filter, ResourceType, Snapshot, SnapshotState, Tag, TagSpecification, Volume, VolumeState,
    VolumeType,
};
use sha2::{Digest, Sha256};

/// The AWS actions restoring calls (checked against the template's grants).
pub const CALLS: &[&str] = &[
    "ec2:DescribeVolumes",
    "ec2:DescribeSnapshots",
    "ec2:CreateVolume",
    "ec2:CreateTags",
    "ec2:DeleteTags",
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
/// The snapshot a restored volume came from.
pub const RESTORED_FROM_TAG: &str = "slipway:restored-from";

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

async fn tagged_volumes(ctx: &Context, key: &str) -> Result<Vec<Volume>, StepError> {
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
        volumes.extend(
            page.volumes()
                .iter()
                .filter(|v| tag(v, SUPERSEDED_TAG).is_none())
                .filter(|v| v.state() != Some(&VolumeState::Deleting))
                .filter(|v| v.state() != Some(&VolumeState::Deleted))
                .cloned(),
        );
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
            let volume = create(ctx, &snapshot_id).await?;
            (volume, old, false, snapshot_id)
        }
    };
    wait_available(ctx, &volume).await?;
    if let Some(old) = &old {
        set_tag(ctx, old, SUPERSEDED_TAG, &volume).await?;
        // Off Data Lifecycle Manager's target too: its snapshots from now
        // on would hold data the cluster has moved on from.
        clear_tag(ctx, old, DATA_TAG).await?;
    }
    set_tag(ctx, &volume, DATA_TAG, &ctx.config.cluster_name).await?;
    clear_tag(ctx, &volume, RESTORING_TAG).await?;
    let what = format!(
        "{} {volume} in {own_zone} from {from}{}",
        if resumed {
            "finished restoring"
        } else {
            "restored"
        },
        old.map_or_else(String::new, |o| format!(", superseding {o}"))
    );
    tracing::warn!(step = STEP, "{what}");
    Ok(Located {
        volume_id: volume,
        restored: Some(what),
    })
}

async fn newest_snapshot(ctx: &Context) -> Result<Option<Snapshot>, StepError> {
    let cluster = &ctx.config.cluster_name;
    let mut newest: Option<Snapshot> = None;
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
        for s in page.snapshots() {
            if s.state() != Some(&SnapshotState::Completed) {
                continue;
            }
            if newest.as_ref().map_or(true, |n| {
                (n.start_time(), n.snapshot_id()) < (s.start_time(), s.snapshot_id())
            }) {
                newest = Some(s.clone());
            }
        }
    }
    Ok(newest)
}

/// A client token for the restore of `snapshot` into `zone` (EC2 takes up
/// to 64 ASCII characters): a retried create returns the same volume.
pub fn client_token(cluster: &str, zone: &str, snapshot: &str) -> String {
    let digest = Sha256::digest(format!("{cluster}\n{zone}\n{snapshot}"));
    format!("slipway-restore-{}", &hex::encode(digest)[..40])
}

async fn create(ctx: &Context, snapshot: &str) -> Result<String, StepError> {
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
        .client_token(client_token(cluster, zone, snapshot))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                // (No spaces: the local AWS checks signatures over a body
                // it re-encodes, and spaces in a tag's value fail that.)
                .tags(t("Name", &format!("{cluster}-etcd-restored")))
                .tags(t(CLUSTER_TAG, cluster))
                .tags(t(RESTORING_TAG, cluster))
                .tags(t(RESTORED_FROM_TAG, snapshot))
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

async fn wait_available(ctx: &Context, volume: &str) -> Result<(), StepError> {
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
            match described.volumes().first().and_then(|v| v.state()) {
                Some(VolumeState::Available | VolumeState::InUse) => Ok(Some(())),
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
        let t = client_token("demo", "us-east-1b", "snap-1");
        assert_eq!(t, client_token("demo", "us-east-1b", "snap-1"));
        assert_ne!(t, client_token("demo", "us-east-1c", "snap-1"));
        assert_ne!(t, client_token("demo", "us-east-1b", "snap-2"));
        assert!(t.len() <= 64 && t.is_ascii(), "{t}");
    }
}
