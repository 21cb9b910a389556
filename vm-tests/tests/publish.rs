//! Publishing the built image against a local AWS (moto, started per
//! test): its disk goes up through the EBS direct APIs as the build mapped
//! it and comes back bit for bit. The publishing itself (regions,
//! idempotence, clashes, clean-up, the template) is tested on synthetic
//! builds in `release.rs`, which need no image.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use image_builder::manifest::{Built, Manifest};
use image_builder::publish::{self, snapshot};
use std::path::{Path, PathBuf};
use vm_tests::moto::Moto;
use vm_tests::releases::{target, template_source, HOME};

/// The image `just build` made (`SLIPWAY_IMAGE_DIR`, else `out/`).
fn built_image() -> PathBuf {
    let dir = std::env::var_os("SLIPWAY_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../out"));
    assert!(
        dir.join("disk.raw").exists() && dir.join("build-manifest.json").exists(),
        "no built image in {}: run `just build` first",
        dir.display()
    );
    dir
}

/// A scratch output directory pointing at the built disk (never written to).
fn scratch_out(image: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        image.join("disk.raw").canonicalize().unwrap(),
        dir.path().join("disk.raw"),
    )
    .unwrap();
    std::fs::copy(
        image.join("build-manifest.json"),
        dir.path().join("build-manifest.json"),
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uploaded_snapshot_reads_back_as_the_disk() {
    let image = built_image();
    let out = scratch_out(&image);
    let moto = Moto::start().unwrap();
    // The build's manifest and map, as the build hands them to the publish.
    let built = Built::from_manifest(out.path(), Manifest::load(out.path()).unwrap());
    assert!(!built.data_blocks.is_empty(), "the build wrote no data map");
    let target = target(&moto, &[]);
    let clients = publish::Clients::for_target(&target).await.unwrap();
    let release = publish::publish(&built, &clients, &target, &template_source())
        .await
        .unwrap();
    let upload = release.upload.clone().unwrap();
    eprintln!(
        "uploaded {} blocks, {:.1} MiB of a {:.0} MiB disk in {:.2}s ({:.1} MiB/s)",
        upload.blocks_sent,
        upload.bytes_sent as f64 / 1048576.0,
        upload.disk_bytes as f64 / 1048576.0,
        upload.seconds,
        upload.bytes_sent as f64 / 1048576.0 / upload.seconds
    );

    // Read every block back: the snapshot holds exactly the disk's non-zero
    // blocks, as an independent scan finds them, and reads back as the disk.
    let c = publish::Clients::new(HOME, Some(&moto.endpoint)).await;
    let back = tempfile::tempdir().unwrap();
    let downloaded = snapshot::download(&c.ebs, &upload.snapshot_id, &back.path().join("disk"))
        .await
        .unwrap();
    let expected = snapshot::nonzero_blocks(&image.join("disk.raw")).unwrap();
    assert_eq!(
        downloaded.blocks, expected,
        "the blocks sent are not the disk's non-zero blocks"
    );
    assert_eq!(upload.blocks_sent, expected.len());
    assert_eq!(
        upload.bytes_sent,
        expected.len() as u64 * snapshot::BLOCK_SIZE
    );
    assert_eq!(downloaded.size, upload.disk_bytes);
    assert_eq!(downloaded.sha256, release.disk_sha256);

    // As `build --region` hands it over, the build's own data map is what
    // the upload reads: nothing else of the disk is read.
    let steps: Vec<&str> = release.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(steps, ["upload", "register", "template"]);
}
