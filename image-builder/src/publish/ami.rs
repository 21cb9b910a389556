//! AMIs: register one from the uploaded snapshot, copy it to the other
//! regions. The AMI's name comes from the image version and its tags carry
//! the disk's sha256, so publishing again finds what is there: the same
//! disk is reused, a different disk under the same version is refused.

use super::{sdk_err, PublishError};
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter,
    ImdsSupportValues, ResourceType, Tag, TagSpecification, VolumeType,
};
use std::time::Duration;

pub const TAG_VERSION: &str = "slipway:version";
pub const TAG_DISK: &str = "slipway:disk-sha256";
/// The root device every AMI is registered with; the launch templates map
/// it (to encrypt it), so the two must agree.
pub const ROOT_DEVICE: &str = "/dev/xvda";

/// What the AMI is for: its name, its tags, its CPU.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub version: String,
    pub disk_sha256: String,
    pub architecture: Architecture,
}

/// The CPU an image is built for (x86_64 today; the types are ready for arm64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    X86_64,
    Arm64,
}

impl Architecture {
    fn ec2(self) -> ArchitectureValues {
        match self {
            Architecture::X86_64 => ArchitectureValues::X8664,
            Architecture::Arm64 => ArchitectureValues::Arm64,
        }
    }
}

impl Identity {
    pub fn tags(&self) -> Vec<(String, String)> {
        vec![
            ("Name".into(), self.name.clone()),
            (TAG_VERSION.into(), self.version.clone()),
            (TAG_DISK.into(), self.disk_sha256.clone()),
        ]
    }

    fn ec2_tags(&self) -> Vec<Tag> {
        self.tags()
            .into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect()
    }
}

/// An AMI found under our name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub image_id: String,
    pub disk_sha256: Option<String>,
    pub state: String,
}

/// Looks for an AMI of ours with this name in the client's region.
pub async fn find(ec2: &aws_sdk_ec2::Client, name: &str) -> Result<Option<Existing>, PublishError> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .map_err(sdk_err(format!("looking for AMI {name}")))?;
    Ok(out.images().first().map(|i| Existing {
        image_id: i.image_id().unwrap_or_default().to_owned(),
        disk_sha256: i
            .tags()
            .iter()
            .find(|t| t.key() == Some(TAG_DISK))
            .and_then(|t| t.value())
            .map(str::to_owned),
        state: i.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
    }))
}

/// Checks that an existing AMI holds this disk; `Ok(id)` if it does.
pub fn reuse(existing: &Existing, id: &Identity, region: &str) -> Result<String, PublishError> {
    match &existing.disk_sha256 {
        Some(d) if *d == id.disk_sha256 => Ok(existing.image_id.clone()),
        other => Err(PublishError::VersionClash {
            name: id.name.clone(),
            region: region.to_owned(),
            image_id: existing.image_id.clone(),
            theirs: other.clone().unwrap_or_else(|| "(no digest tag)".into()),
            ours: id.disk_sha256.clone(),
        }),
    }
}

/// The RegisterImage request: UEFI, ENA, IMDSv2 only, the snapshot as root.
pub fn register_request(
    ec2: &aws_sdk_ec2::Client,
    id: &Identity,
    snapshot_id: &str,
) -> aws_sdk_ec2::operation::register_image::builders::RegisterImageFluentBuilder {
    ec2.register_image()
        .name(&id.name)
        .description(format!(
            "Slipway {} (disk sha256 {})",
            id.version, id.disk_sha256
        ))
        .architecture(id.architecture.ec2())
        .boot_mode(BootModeValues::Uefi)
        .ena_support(true)
        .imds_support(ImdsSupportValues::V20)
        .virtualization_type("hvm")
        .root_device_name(ROOT_DEVICE)
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(ROOT_DEVICE)
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(snapshot_id)
                        .volume_type(VolumeType::Gp3)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(id.ec2_tags()))
                .build(),
        )
}

pub async fn register(
    ec2: &aws_sdk_ec2::Client,
    id: &Identity,
    snapshot_id: &str,
) -> Result<String, PublishError> {
    let out = register_request(ec2, id, snapshot_id)
        .send()
        .await
        .map_err(sdk_err(format!("registering {}", id.name)))?;
    let image_id = out
        .image_id()
        .ok_or_else(|| PublishError::Invalid("RegisterImage returned no image ID".into()))?
        .to_owned();
    tag(ec2, &image_id, id).await?;
    Ok(image_id)
}

/// Tags an image (again): the tag specification covers registration on
/// AWS; an explicit CreateTags also covers copies and local stand-ins.
pub async fn tag(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
    id: &Identity,
) -> Result<(), PublishError> {
    ec2.create_tags()
        .resources(image_id)
        .set_tags(Some(id.ec2_tags()))
        .send()
        .await
        .map_err(sdk_err(format!("tagging {image_id}")))?;
    Ok(())
}

/// Copies the source region's AMI into the client's region.
pub async fn copy(
    ec2: &aws_sdk_ec2::Client,
    id: &Identity,
    source_region: &str,
    source_image: &str,
) -> Result<String, PublishError> {
    let out = ec2
        .copy_image()
        .name(&id.name)
        .description(format!(
            "Slipway {} (disk sha256 {})",
            id.version, id.disk_sha256
        ))
        .source_region(source_region)
        .source_image_id(source_image)
        .copy_image_tags(true)
        .send()
        .await
        .map_err(sdk_err(format!(
            "copying {source_image} from {source_region}"
        )))?;
    let image_id = out
        .image_id()
        .ok_or_else(|| PublishError::Invalid("CopyImage returned no image ID".into()))?
        .to_owned();
    tag(ec2, &image_id, id).await?;
    Ok(image_id)
}

/// Waits until the AMI is available (copies take minutes on AWS).
pub async fn wait_available(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Result<(), PublishError> {
    let failed = ["failed", "error", "deregistered"];
    super::wait_for_state(
        image_id,
        Duration::from_secs(5),
        "available",
        &failed,
        || async {
            let out = ec2
                .describe_images()
                .image_ids(image_id)
                .send()
                .await
                .map_err(sdk_err(format!("describing {image_id}")))?;
            Ok(out
                .images()
                .first()
                .and_then(|i| i.state())
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default())
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registration_asks_for_uefi_ena_imdsv2_and_the_snapshot_as_root() {
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .build();
        let ec2 = aws_sdk_ec2::Client::from_conf(conf);
        let id = Identity {
            name: "slipway-1.2.3".into(),
            version: "1.2.3".into(),
            disk_sha256: "ab".repeat(32),
            architecture: Architecture::X86_64,
        };
        let req = register_request(&ec2, &id, "snap-0123456789abcdef0");
        let input = req.as_input();
        assert_eq!(input.get_name().as_deref(), Some("slipway-1.2.3"));
        assert_eq!(input.get_boot_mode(), &Some(BootModeValues::Uefi));
        assert_eq!(input.get_ena_support(), &Some(true));
        assert_eq!(input.get_imds_support(), &Some(ImdsSupportValues::V20));
        assert_eq!(input.get_architecture(), &Some(ArchitectureValues::X8664));
        assert_eq!(input.get_root_device_name().as_deref(), Some(ROOT_DEVICE));
        let bdm = input.get_block_device_mappings().as_ref().unwrap();
        assert_eq!(bdm.len(), 1);
        assert_eq!(bdm[0].device_name(), Some(ROOT_DEVICE));
        let ebs = bdm[0].ebs().unwrap();
        assert_eq!(ebs.snapshot_id(), Some("snap-0123456789abcdef0"));
        let tags = input.get_tag_specifications().as_ref().unwrap()[0].tags();
        assert!(tags
            .iter()
            .any(|t| t.key() == Some(TAG_DISK) && t.value() == Some(id.disk_sha256.as_str())));
    }

    #[test]
    fn reuse_accepts_the_same_disk_and_refuses_another() {
        let id = Identity {
            name: "slipway-1.2.3".into(),
            version: "1.2.3".into(),
            disk_sha256: "aa".into(),
            architecture: Architecture::X86_64,
        };
        let mut existing = Existing {
            image_id: "ami-1".into(),
            disk_sha256: Some("aa".into()),
            state: "available".into(),
        };
        assert_eq!(reuse(&existing, &id, "us-east-1").unwrap(), "ami-1");
        existing.disk_sha256 = Some("bb".into());
        let err = reuse(&existing, &id, "us-east-1").unwrap_err().to_string();
        assert!(
            err.contains("slipway-1.2.3") && err.contains("new version"),
            "{err}"
        );
    }
}
