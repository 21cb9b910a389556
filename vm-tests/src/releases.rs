//! Publishing in the tests: builds to publish (the built image, or a small
//! synthetic one that needs no build) and a publish run the way the binary
//! runs it, against moto.

use crate::moto::Moto;
use anyhow::{Context, Result};
use image_builder::manifest::{Built, FileDigest, Manifest, VerityInfo};
use image_builder::payload::{Recorded, RecordedArtifact};
use image_builder::publish::{self, Release, Target};
use std::path::{Path, PathBuf};

/// The region a test publishes to first.
pub const HOME: &str = "us-east-1";

/// A target of `home` and `copies` against moto, with SSM parameters.
pub fn target(moto: &Moto, copies: &[&str]) -> Target {
    Target {
        region: Some(HOME.into()),
        copy_to: copies.iter().map(|s| s.to_string()).collect(),
        template: None,
        ssm_prefix: Some("/slipway".into()),
        current_kubernetes: None,
        upload_concurrency: 8,
        endpoint_url: Some(moto.endpoint.clone()),
    }
}

/// The workspace's template source.
pub fn template_source() -> PathBuf {
    crate::workspace_dir().join("cfn/template.yaml")
}

/// Publishes a build directory as `image-builder publish` does: the disk
/// checked against its manifest in one read, then clients for the
/// target's regions.
pub async fn publish_dir(out: &Path, target: &Target) -> Result<Release, publish::PublishError> {
    let built = Built::read(out).map_err(|e| publish::PublishError::Invalid(e.to_string()))?;
    let clients = publish::Clients::for_target(target).await?;
    publish::publish(&built, &clients, target, &template_source()).await
}

/// Images and snapshots the account owns in `region`.
pub async fn count(moto: &Moto, region: &str) -> Result<(usize, usize)> {
    let c = publish::Clients::new(region, Some(&moto.endpoint)).await;
    let images = c.ec2.describe_images().owners("self").send().await?;
    let snaps = c.ec2.describe_snapshots().owner_ids("self").send().await?;
    Ok((images.images().len(), snaps.snapshots().len()))
}

/// A build directory with a 1 GiB disk holding `marker` in three places
/// and a manifest naming the workspace's image and its kubelet: a release
/// for the tests of publishing itself, without building an image.
pub fn synthetic_build(marker: &[u8]) -> Result<tempfile::TempDir> {
    let spec = image_builder::spec::Spec::load(&crate::workspace_dir().join("image.toml"))?;
    let kubelet = spec
        .payload
        .artifacts
        .iter()
        .find(|a| a.name == "kubelet")
        .context("image.toml names no kubelet")?;
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.raw");
    let f = std::fs::File::create(&disk)?;
    f.set_len(1 << 30)?;
    for offset in [4096, 300 << 20, (1 << 30) - 8192] {
        std::os::unix::fs::FileExt::write_all_at(&f, marker, offset)?;
    }
    drop(f);
    let digest = |file: &str| -> Result<FileDigest> {
        let path = dir.path().join(file);
        Ok(FileDigest {
            file: file.into(),
            size: std::fs::metadata(&path)?.len(),
            sha256: image_builder::cache::sha256_file(&path)?,
        })
    };
    let manifest = Manifest {
        name: spec.image.name.clone(),
        version: spec.image.version.clone(),
        inputs: "synthetic".into(),
        disk: digest("disk.raw")?,
        qcow2: FileDigest {
            file: "disk.qcow2".into(),
            size: 0,
            sha256: String::new(),
        },
        disk_guid: String::new(),
        partitions: Vec::new(),
        data_blocks: Vec::new(),
        verity: VerityInfo {
            root_hash: String::new(),
            salt: String::new(),
            data_blocks: 0,
            hash_device_size: 0,
        },
        kernel: String::new(),
        cmdline: String::new(),
        uki_size: 0,
        root_tree_bytes: 0,
        packages: Vec::new(),
        payload: Recorded {
            artifacts: vec![RecordedArtifact {
                name: kubelet.name.clone(),
                version: kubelet.version.clone(),
                sha256: "0".repeat(64),
                member: None,
                file_sha256: "0".repeat(64),
                path: "/usr/bin/kubelet".into(),
            }],
            images: Vec::new(),
            image_files: Vec::new(),
        },
        stages: Vec::new(),
        total_seconds: 0.0,
    };
    manifest.save(dir.path())?;
    Ok(dir)
}
