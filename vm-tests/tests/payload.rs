//! The pre-pulled payload under QEMU, with no network at all (so no
//! registry): containerd lists every image the build manifest names, a
//! container from one of them runs under crun, the image has no runc to
//! fall back to, and a container's scope stops only after the member's
//! leave at shutdown. The check itself is a unit handed to
//! the guest as a systemd credential, so the image is the one we ship.

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use vm_tests::{Image, Vm, VmConfig};

/// A transient scope named as containerd names a container's.
const SCOPE: &str = "cri-containerd-slipway-payload-check";
/// Boot, import (hundreds of MiB under TCG) and a container start.
const DEADLINE: Duration = Duration::from_secs(900);

#[test]
fn prepulled_images_are_imported_and_run_without_a_registry() -> Result<()> {
    let image = Image::locate()?;
    let images: Vec<String> = image.manifest["payload"]["images"]
        .as_array()
        .context("the build manifest has no payload.images")?
        .iter()
        .filter_map(|i| i["reference"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        !images.is_empty(),
        "the image carries no container images: build it with the payload (`just build`)"
    );
    let etcd = images
        .iter()
        .find(|r| r.contains("/etcd:"))
        .context("no etcd image in the payload")?
        .clone();
    // Host binaries: the installed file's sha256, as the manifest records it.
    let artifacts: Vec<(String, String)> = image.manifest["payload"]["artifacts"]
        .as_array()
        .context("the build manifest has no payload.artifacts")?
        .iter()
        .filter_map(|a| {
            Some((
                a["path"].as_str()?.to_owned(),
                a["file_sha256"].as_str()?.to_owned(),
            ))
        })
        .collect();
    ensure!(!artifacts.is_empty(), "the image carries no host binaries");
    let paths: Vec<&str> = artifacts.iter().map(|(p, _)| p.as_str()).collect();
    let check = format!(
        "[Unit]\nDescription=payload check (test only)\nRequires=slipway-images.service\nAfter=slipway-images.service\n\n\
         [Service]\nType=oneshot\nStandardOutput=journal+console\nStandardError=journal+console\n\
         ExecStart=/bin/sh -c 'sha256sum {paths} | sed \"s/^/SLIPWAY-TEST-SHA /\"; ctr -n k8s.io images ls -q | sed \"s/^/SLIPWAY-TEST-IMAGE /\"; \
         ctr -n k8s.io images ls | grep -c io.cri-containerd.pinned=pinned | sed \"s/^/SLIPWAY-TEST-PINNED /\"; \
         ctr -n k8s.io run --runc-binary /usr/bin/crun --rm {etcd} payload-check /usr/local/bin/etcd --version 2>&1 | sed \"s/^/SLIPWAY-TEST-RUN /\"; \
         ctr -n k8s.io run --runc-binary /usr/bin/crun --rm {etcd} payload-etcdutl /usr/local/bin/etcdutl version 2>&1 | sed \"s/^/SLIPWAY-TEST-ETCDUTL /\"; \
         echo SLIPWAY-TEST-RUNC $$(command -v runc || echo none); \
         systemd-run --quiet --scope --unit={SCOPE} sleep 30 & sleep 3; \
         systemctl show --property=Before {SCOPE}.scope | sed \"s/^/SLIPWAY-TEST-SCOPE /\"; \
         echo SLIPWAY-TEST-DONE'\n",
        paths = paths.join(" ")
    );
    let mut cfg = VmConfig::new("payload", image.qcow2(), "qcow2")
        .with_test_unit("slipway-payload-check.service", &check);
    cfg.memory_mib = 2048;
    let mut vm = Vm::boot(&cfg)?;
    vm.wait_for(&["SLIPWAY-TEST-DONE"], DEADLINE)?;
    let console = vm.console();
    let listed: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split("SLIPWAY-TEST-IMAGE ").nth(1))
        .map(str::trim)
        .collect();
    for r in &images {
        ensure!(
            listed.contains(&r.as_str()),
            "{r} is not in containerd: {listed:?}\n{}",
            vm.tail(60)
        );
    }
    for (path, sha) in &artifacts {
        let line = format!("SLIPWAY-TEST-SHA {sha}  {path}");
        ensure!(
            console.contains(&line),
            "{path} in the image does not have sha256 {sha}\n{}",
            vm.tail(60)
        );
    }
    // What the check printed after `marker` (its first such line).
    let marked = |marker: &str| {
        console
            .lines()
            .find_map(|l| l.split(marker).nth(1))
            .unwrap_or("")
    };
    let pinned: usize = marked("SLIPWAY-TEST-PINNED ").trim().parse().unwrap_or(0);
    ensure!(
        pinned >= images.len(),
        "only {pinned} of {} images are pinned",
        images.len()
    );
    let version = marked("SLIPWAY-TEST-RUN ");
    ensure!(
        version.contains("etcd Version: 3.6"),
        "the etcd container did not run: {version:?}\n{}",
        vm.tail(60)
    );
    // The etcd image carries etcdutl, which a restore from an etcd backup
    // takes out of it.
    let etcdutl = marked("SLIPWAY-TEST-ETCDUTL ");
    ensure!(
        etcdutl.contains("etcdutl version: 3.6"),
        "etcdutl did not run from the etcd image: {etcdutl:?}\n{}",
        vm.tail(60)
    );
    // containerd's configuration names crun; no runc may stand behind it.
    let runc = marked("SLIPWAY-TEST-RUNC ").trim();
    ensure!(
        runc == "none",
        "the image carries a runc ({runc:?}): every container must run under crun\n{}",
        vm.tail(60)
    );
    // A scope named as containerd names each container's is ordered
    // before slipway-leave.service (the image's drop-in), so at shutdown,
    // when units stop in reverse order, the containers outlive the
    // member's drain.
    let before = marked("SLIPWAY-TEST-SCOPE ");
    ensure!(
        before.starts_with("Before=") && before.contains("slipway-leave.service"),
        "a container's scope is not ordered before slipway-leave.service: {before:?}\n{}",
        vm.tail(60)
    );
    if let Some(line) = console.lines().find(|l| l.contains("imported and pinned")) {
        eprintln!("{}", line.trim());
    }
    eprintln!(
        "payload checked {:.1}s after QEMU started",
        vm.elapsed().as_secs_f64()
    );
    Ok(())
}
