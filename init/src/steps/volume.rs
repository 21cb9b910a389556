//! The master's data volume: find it by its tag (restoring one in this
//! zone when it is elsewhere, see [`super::restore`]), attach it (taking it
//! from a dead predecessor),
//! wait for its NVMe device (the controller serial carries the volume ID),
//! format it only when it is blank, and mount it where etcd keeps its data.

use super::{aws_err, Context, Master, Report, StepError};
use crate::bootcheck::parse_mountinfo;
use crate::retry::{self, Backoff};
use aws_sdk_ec2::types::{Instance, InstanceStateName, VolumeState};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const STEP: &str = "data-volume";
/// The AWS actions this step calls (checked against the template's grants);
/// it also reads the bucket through [`super::secrets::exists`].
pub const CALLS: &[&str] = &[
    "ec2:DescribeVolumes",
    "ec2:DescribeInstances",
    "ec2:DetachVolume",
    "ec2:AttachVolume",
];
/// The device names a data volume may take, first free first.
const DEVICE_LETTERS: std::ops::RangeInclusive<char> = 'f'..='p';
const LABEL: &str = "slipway-data";
/// How much of a device is read to decide whether it is blank.
const PROBE_BYTES: usize = 1 << 20;

/// What is on a device, judged from its first MiB.
#[derive(Debug, PartialEq, Eq)]
pub enum Contents {
    Blank,
    Ext4,
    /// A partition table or a filesystem we do not manage: never formatted.
    Other(&'static str),
}

pub fn probe(head: &[u8]) -> Contents {
    let at = |o: usize, magic: &[u8]| head.get(o..o + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xef]) {
        Contents::Ext4
    } else if at(512, b"EFI PART") {
        Contents::Other("a GPT partition table")
    } else if at(0, b"XFSB") {
        Contents::Other("an XFS filesystem")
    } else if at(510, &[0x55, 0xaa]) {
        Contents::Other("an MBR partition table")
    } else if head.iter().all(|&b| b == 0) {
        Contents::Blank
    } else {
        Contents::Other("unrecognised data")
    }
}

/// The block device of the NVMe controller whose serial is `volume_id`
/// (EBS reports it without the hyphen).
pub fn find_device(nvme_class: &Path, dev: &Path, volume_id: &str) -> Option<PathBuf> {
    let serial = volume_id.replace('-', "");
    for entry in std::fs::read_dir(nvme_class).ok()?.flatten() {
        let Ok(s) = std::fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if s.trim() == serial {
            let name = entry.file_name().to_string_lossy().into_owned();
            return Some(dev.join(format!("{name}n1")));
        }
    }
    None
}

/// The data volume as EC2 describes it.
struct Described {
    zone: Option<String>,
    state: Option<VolumeState>,
    /// The instance it is attached to (or being attached to or detached from).
    holder: Option<String>,
}

async fn describe_volume(ctx: &Context, volume_id: &str) -> Result<Described, StepError> {
    let described = ctx
        .aws
        .ec2
        .describe_volumes()
        .volume_ids(volume_id)
        .send()
        .await
        .map_err(aws_err(
            "ec2:DescribeVolumes",
            format!("looking up volume {volume_id}"),
        ))?;
    let volume = described
        .volumes()
        .first()
        .ok_or_else(|| StepError::Refused {
            what: STEP.into(),
            message: format!("volume {volume_id} does not exist"),
        })?;
    Ok(Described {
        zone: volume.availability_zone().map(str::to_owned),
        state: volume.state().cloned(),
        holder: volume
            .attachments()
            .iter()
            .find_map(|a| a.instance_id().filter(|i| !i.is_empty()).map(str::to_owned)),
    })
}

async fn instance_state(ctx: &Context, id: &str) -> Result<Option<InstanceStateName>, StepError> {
    let instance = describe_instance(ctx, id, "which holds the data volume").await?;
    Ok(instance.and_then(|i| i.state().and_then(|s| s.name()).cloned()))
}

/// One instance as EC2 describes it; `None` once it is gone.
async fn describe_instance(
    ctx: &Context,
    id: &str,
    why: &str,
) -> Result<Option<Instance>, StepError> {
    Ok(ctx
        .aws
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(aws_err(
            "ec2:DescribeInstances",
            format!("looking up {id}, {why}"),
        ))?
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .next()
        .cloned())
}

/// Takes the volume from its previous holder without force: a running,
/// pending or stopping holder is waited for (up to `holder-stops`); a
/// stopped one is asked to let go (a plain detach, which waits for the
/// holder's writes); a terminating one lets go by itself. Returns once the
/// volume is `available` (up to `volume-available`).
async fn release(ctx: &Context, volume_id: &str, old: &str) -> Result<(), StepError> {
    let deadlines = &ctx.deadlines;
    let state = retry::until(
        &format!("{old}, which holds {volume_id}, to stop"),
        Backoff::new(deadlines.holder_stops),
        || async {
            let state = instance_state(ctx, old).await?;
            let alive = matches!(
                state,
                Some(
                    InstanceStateName::Running
                        | InstanceStateName::Pending
                        | InstanceStateName::Stopping
                )
            );
            if alive {
                tracing::info!(
                    step = STEP,
                    "{volume_id} is held by {old}, which is {}: waiting for it to stop",
                    state.as_ref().map_or("?", |s| s.as_str())
                );
            }
            Ok::<_, StepError>((!alive).then_some(state))
        },
    )
    .await
    .map_err(|e| match e {
        retry::WaitError::Deadline { waited, .. } => StepError::Wait(format!(
            "volume {volume_id} is attached to {old}, which is still running after {}s; \
             two masters must never share etcd's data, so this one will not take it",
            waited.as_secs()
        )),
        retry::WaitError::Failed { source, .. } => source,
    })?;
    if state == Some(InstanceStateName::Stopped) {
        ctx.aws
            .ec2
            .detach_volume()
            .volume_id(volume_id)
            .instance_id(old)
            .send()
            .await
            .map_err(aws_err(
                "ec2:DetachVolume",
                format!("detaching {volume_id} from {old}"),
            ))?;
    }
    retry::until(
        &format!("{volume_id} to become available after leaving {old}"),
        Backoff::new(deadlines.volume_available),
        || async {
            let v = describe_volume(ctx, volume_id).await?;
            match (&v.state, &v.holder) {
                (Some(VolumeState::Available), _) => Ok(Some(())),
                (_, Some(h)) if h != old => Err(StepError::Refused {
                    what: STEP.into(),
                    message: format!("{h} took {volume_id} while this master waited for it"),
                }),
                _ => Ok(None),
            }
        },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))
}

async fn attach(ctx: &Context, volume_id: &str) -> Result<Option<String>, StepError> {
    let id = &ctx.instance.id;
    let volume = describe_volume(ctx, volume_id).await?;
    if volume.zone.as_deref() != Some(ctx.instance.availability_zone.as_str()) {
        return Err(StepError::Refused {
            what: STEP.into(),
            message: format!(
                "volume {volume_id} is in {}, this instance in {}",
                volume.zone.as_deref().unwrap_or("?"),
                ctx.instance.availability_zone
            ),
        });
    }
    if volume.holder.as_deref() == Some(id.as_str()) {
        return Ok(None);
    }
    if let Some(old) = &volume.holder {
        release(ctx, volume_id, old).await?;
    }
    let used = used_devices(ctx).await?;
    let device = free_device(&used).ok_or_else(|| StepError::Refused {
        what: STEP.into(),
        message: format!("{id} has no free device name for {volume_id} (in use: {used:?})"),
    })?;
    ctx.aws
        .ec2
        .attach_volume()
        .volume_id(volume_id)
        .instance_id(id)
        .device(&device)
        .send()
        .await
        .map_err(aws_err(
            "ec2:AttachVolume",
            format!(
                "attaching {volume_id} to {id} in {}",
                ctx.instance.availability_zone
            ),
        ))?;
    Ok(Some(volume.holder.map_or_else(
        || format!("attached {volume_id}"),
        |old| format!("attached {volume_id} (taken over from {old})"),
    )))
}

/// The first device name from `/dev/xvdf` on that none of `used` takes
/// (EC2 counts `/dev/sdX` and `/dev/xvdX` as one slot). After a person's
/// restore, the superseded volume may still be attached at `/dev/xvdf`
/// when this instance reboots; the restored one then takes the next.
pub fn free_device(used: &[String]) -> Option<String> {
    let taken: Vec<&str> = used.iter().filter_map(|u| device_letter(u)).collect();
    DEVICE_LETTERS
        .map(String::from)
        .find(|l| !taken.contains(&l.as_str()))
        .map(|l| format!("/dev/xvd{l}"))
}

/// The slot of an EC2 device name: what follows `/dev/xvd` or `/dev/sd`.
fn device_letter(name: &str) -> Option<&str> {
    name.strip_prefix("/dev/xvd")
        .or_else(|| name.strip_prefix("/dev/sd"))
}

/// Whether EC2's device name is one a data volume is attached at
/// (`/dev/xvdf` to `/dev/xvdp`, or their `/dev/sd` names), not a root's.
pub fn is_data_device(name: &str) -> bool {
    let mut chars = device_letter(name).unwrap_or_default().chars();
    matches!((chars.next(), chars.next()), (Some(c), None) if DEVICE_LETTERS.contains(&c))
}

/// The device names this instance's volumes are attached at.
async fn used_devices(ctx: &Context) -> Result<Vec<String>, StepError> {
    let instance = describe_instance(ctx, &ctx.instance.id, "for its devices in use").await?;
    Ok(instance
        .iter()
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| m.device_name().map(str::to_owned))
        .collect())
}

fn read_head(device: &Path) -> Result<Vec<u8>, StepError> {
    let mut head = vec![0u8; PROBE_BYTES];
    let mut f = std::fs::File::open(device).map_err(|e| StepError::Invalid {
        what: format!("opening {}", device.display()),
        message: e.to_string(),
    })?;
    let mut filled = 0;
    while filled < head.len() {
        match f.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => {
                return Err(StepError::Invalid {
                    what: format!("reading {}", device.display()),
                    message: e.to_string(),
                })
            }
        }
    }
    head.truncate(filled);
    Ok(head)
}

/// A blank volume is a new cluster's. If the bucket already holds the
/// cluster's PKI, the volume that held its etcd data is lost or the wrong
/// one: formatting it would start an empty etcd under the old CA, so the
/// boot stops unless the stack config says this boot is a restore.
async fn refuse_blank_if_the_cluster_exists(
    ctx: &Master<'_>,
    volume_id: &str,
    device: &Path,
) -> Result<(), StepError> {
    let key = super::secrets::pki_key(&ctx.config.cluster_name);
    if ctx.settings.restore || !super::secrets::exists(ctx, &key).await? {
        return Ok(());
    }
    Err(StepError::Refused {
        what: STEP.into(),
        message: format!(
            "{} ({}) is blank but s3://{}/{key} exists: this cluster's etcd data is \
             on another volume; refusing to start an empty etcd under the cluster's CA \
             (set master_restore = true in the stack config to start afresh on purpose)",
            device.display(),
            volume_id,
            ctx.config.secrets_bucket
        ),
    })
}

/// Attaches, formats if blank, and mounts the volume at `mount_point`.
pub async fn run(ctx: &Master<'_>, mount_point: &Path) -> Result<Report, StepError> {
    let located = super::restore::locate(ctx).await?;
    let volume_id = &located.volume_id;
    let attached = attach(ctx, volume_id).await?;

    let (class, dev) = (&ctx.paths.nvme_class, &ctx.paths.dev);
    let device = retry::until(
        &format!("the NVMe device of {volume_id}"),
        Backoff::new(ctx.deadlines.volume_device),
        || async { Ok::<_, StepError>(find_device(class, dev, volume_id)) },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;

    let mountinfo =
        std::fs::read_to_string(ctx.paths.proc.join("self/mountinfo")).unwrap_or_default();
    let target = mount_point.to_string_lossy();
    let mut did: Vec<String> = located.restored.into_iter().chain(attached).collect();
    if parse_mountinfo(&mountinfo)
        .iter()
        .any(|m| m.mount_point == target)
    {
        let mounted = format!("{} already mounted on {target}", device.display());
        // A restore cut short after the mount goes on here.
        if let Some(key) = &located.fill_from {
            if let Some(filled) = super::restore::fill(ctx, mount_point, key).await? {
                did.extend([mounted, filled]);
                return Ok(Report::changed(STEP, did.join("; ")));
            }
        }
        let what = if did.is_empty() {
            format!("{volume_id} was attached")
        } else {
            did.join("; ")
        };
        return Ok(Report::already(STEP, format!("{what}; {mounted}")));
    }

    match probe(&read_head(&device)?) {
        Contents::Ext4 => {}
        Contents::Blank => {
            // A volume made empty for an etcd backup is blank on purpose.
            if located.fill_from.is_none() {
                refuse_blank_if_the_cluster_exists(ctx, volume_id, &device).await?;
            }
            ctx.runner
                .run("mkfs.ext4", &["-q", "-L", LABEL, &device.to_string_lossy()])?;
            did.push(format!("formatted {} (it was blank)", device.display()));
        }
        Contents::Other(what) => {
            return Err(StepError::Refused {
                what: STEP.into(),
                message: format!(
                    "{} holds {what}; refusing to format or mount it",
                    device.display()
                ),
            });
        }
    }
    std::fs::create_dir_all(mount_point).map_err(|e| StepError::Invalid {
        what: format!("creating {target}"),
        message: e.to_string(),
    })?;
    ctx.runner.run(
        "mount",
        &[
            "-o",
            "nosuid,nodev,noexec",
            &device.to_string_lossy(),
            &target,
        ],
    )?;
    did.push(format!("mounted {} on {target}", device.display()));
    if let Some(key) = &located.fill_from {
        did.extend(super::restore::fill(ctx, mount_point, key).await?);
    }
    Ok(Report::changed(STEP, did.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_ext4_and_foreign_devices_are_told_apart() {
        let mut head = vec![0u8; 4096];
        assert_eq!(probe(&head), Contents::Blank);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(probe(&head), Contents::Ext4);
        let mut gpt = vec![0u8; 4096];
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert!(matches!(probe(&gpt), Contents::Other(_)));
        let mut junk = vec![0u8; 4096];
        junk[3000] = 1;
        assert_eq!(probe(&junk), Contents::Other("unrecognised data"));
    }

    #[test]
    fn only_data_volume_device_names_are_data_devices() {
        for name in ["/dev/xvdf", "/dev/xvdg", "/dev/sdp"] {
            assert!(is_data_device(name), "{name}");
        }
        for name in ["/dev/xvda", "/dev/sda1", "/dev/xvdq", "/dev/xvdff", "xvdf"] {
            assert!(!is_data_device(name), "{name}");
        }
    }

    #[test]
    fn the_first_free_device_name_is_taken() {
        let names = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            free_device(&names(&["/dev/xvda"])).as_deref(),
            Some("/dev/xvdf")
        );
        assert_eq!(
            free_device(&names(&["/dev/xvda", "/dev/xvdf"])).as_deref(),
            Some("/dev/xvdg")
        );
        // EC2 counts sdX and xvdX as one slot.
        assert_eq!(
            free_device(&names(&["/dev/sdf", "/dev/xvdg"])).as_deref(),
            Some("/dev/xvdh")
        );
        let all: Vec<String> = ('f'..='p').map(|c| format!("/dev/xvd{c}")).collect();
        assert_eq!(free_device(&all), None);
    }

    #[test]
    fn the_device_is_found_by_its_serial() {
        let class = tempfile::tempdir().unwrap();
        for (ctrl, serial) in [
            ("nvme0", "AWS-root-disk"),
            ("nvme1", "vol0123456789abcdef0"),
        ] {
            std::fs::create_dir(class.path().join(ctrl)).unwrap();
            std::fs::write(
                class.path().join(ctrl).join("serial"),
                format!("{serial}\n"),
            )
            .unwrap();
        }
        let dev = find_device(class.path(), Path::new("/dev"), "vol-0123456789abcdef0");
        assert_eq!(dev, Some(PathBuf::from("/dev/nvme1n1")));
        assert_eq!(
            find_device(class.path(), Path::new("/dev"), "vol-0000000000000000f"),
            None
        );
    }
}
