//! The master's data volume: attach it (taking it from a dead predecessor),
//! wait for its NVMe device (the controller serial carries the volume ID),
//! format it only when it is blank, and mount it where etcd keeps its data.

use super::{aws_err, Context, Report, StepError};
use crate::bootcheck::parse_mountinfo;
use crate::retry::{self, Backoff};
use aws_sdk_ec2::types::{InstanceStateName, VolumeState};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const STEP: &str = "data-volume";
const DEVICE_NAME: &str = "/dev/xvdf";
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

async fn attach(ctx: &Context, volume_id: &str) -> Result<Option<String>, StepError> {
    let id = &ctx.instance.id;
    let ec2 = &ctx.aws.ec2;
    let described = ec2
        .describe_volumes()
        .volume_ids(volume_id)
        .send()
        .await
        .map_err(aws_err(format!("looking up volume {volume_id}")))?;
    let volume = described
        .volumes()
        .first()
        .ok_or_else(|| StepError::Invalid {
            what: STEP.into(),
            message: format!("volume {volume_id} does not exist"),
        })?;
    if volume.availability_zone() != Some(ctx.instance.availability_zone.as_str()) {
        return Err(StepError::Invalid {
            what: STEP.into(),
            message: format!(
                "volume {volume_id} is in {}, this instance in {}",
                volume.availability_zone().unwrap_or("?"),
                ctx.instance.availability_zone
            ),
        });
    }
    let holder = volume
        .attachments()
        .iter()
        .find_map(|a| a.instance_id().filter(|i| !i.is_empty()).map(str::to_owned));
    if holder.as_deref() == Some(id.as_str()) {
        return Ok(None);
    }
    if let Some(old) = &holder {
        // Only a dead master may lose its volume: two live masters on one
        // etcd data directory would be worse than no master at all.
        let state = ec2
            .describe_instances()
            .instance_ids(old)
            .send()
            .await
            .map_err(aws_err(format!(
                "looking up {old}, which holds {volume_id}"
            )))?
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| i.state().and_then(|s| s.name()).cloned());
        if matches!(
            state,
            Some(InstanceStateName::Running) | Some(InstanceStateName::Pending)
        ) {
            return Err(StepError::Invalid {
                what: STEP.into(),
                message: format!("volume {volume_id} is attached to {old}, which is still running"),
            });
        }
        ec2.detach_volume()
            .volume_id(volume_id)
            .instance_id(old)
            .force(true)
            .send()
            .await
            .map_err(aws_err(format!("detaching {volume_id} from {old}")))?;
        retry::until(
            &format!("{volume_id} to detach from {old}"),
            Backoff::new(Duration::from_secs(300)),
            || async {
                let v = ec2
                    .describe_volumes()
                    .volume_ids(volume_id)
                    .send()
                    .await
                    .map_err(aws_err(format!("looking up volume {volume_id}")))?;
                Ok::<_, StepError>(
                    v.volumes()
                        .first()
                        .filter(|v| v.state() == Some(&VolumeState::Available))
                        .map(|_| ()),
                )
            },
        )
        .await
        .map_err(|e| StepError::Wait(e.to_string()))?;
    }
    ec2.attach_volume()
        .volume_id(volume_id)
        .instance_id(id)
        .device(DEVICE_NAME)
        .send()
        .await
        .map_err(aws_err(format!(
            "attaching {volume_id} to {id} in {}",
            ctx.instance.availability_zone
        )))?;
    Ok(Some(holder.map_or_else(
        || format!("attached {volume_id}"),
        |old| format!("attached {volume_id} (taken over from {old})"),
    )))
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

/// Attaches, formats if blank, and mounts the volume at `mount_point`.
pub async fn run(ctx: &Context, mount_point: &Path) -> Result<Report, StepError> {
    let Some(master) = &ctx.config.master else {
        return Err(StepError::Invalid {
            what: STEP.into(),
            message: "only a master has a data volume".into(),
        });
    };
    let volume_id = &master.volume_id;
    let attached = attach(ctx, volume_id).await?;

    let (class, dev) = (&ctx.paths.nvme_class, &ctx.paths.dev);
    let device = retry::until(
        &format!("the NVMe device of {volume_id}"),
        Backoff::new(Duration::from_secs(120)),
        || async { Ok::<_, StepError>(find_device(class, dev, volume_id)) },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;

    let mountinfo =
        std::fs::read_to_string(ctx.paths.proc.join("self/mountinfo")).unwrap_or_default();
    let target = mount_point.to_string_lossy();
    if parse_mountinfo(&mountinfo)
        .iter()
        .any(|m| m.mount_point == target)
    {
        let what = attached.unwrap_or_else(|| format!("{volume_id} was attached"));
        return Ok(Report::already(
            STEP,
            format!("{what}; {} already mounted on {target}", device.display()),
        ));
    }

    let mut did = attached.clone().into_iter().collect::<Vec<_>>();
    match probe(&read_head(&device)?) {
        Contents::Ext4 => {}
        Contents::Blank => {
            ctx.runner
                .run("mkfs.ext4", &["-q", "-L", LABEL, &device.to_string_lossy()])?;
            did.push(format!("formatted {} (it was blank)", device.display()));
        }
        Contents::Other(what) => {
            return Err(StepError::Invalid {
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
