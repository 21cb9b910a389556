//! `slipway-cluster DIR`: brings up a local cluster from the built image
//! (published to moto, master and node as QEMU VMs on a private network; see
//! `vm_tests::cluster`), writes `DIR/kubeconfig` once both members are
//! Ready, prints how to use it, and keeps the cluster running until it is
//! sent SIGTERM or SIGINT (`just demo-down`), then stops every VM and
//! service it started.
//!
//! Meanwhile it rolls the cluster to a new release when asked (`just
//! demo-update`): a path to a built image written to `DIR/update-request`
//! is published as the next release, the stack is updated to it and both
//! groups roll as a rolling update would (see `vm_tests::cluster`); the
//! outcome lands in `DIR/updated` or `DIR/update-failed`.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vm_tests::cluster::{Cluster, Options, Role};
use vm_tests::Image;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Rolls the cluster to the image built in `image_dir`: the master, then
/// the node, each leaving cleanly and replaced from the new release.
fn update(cluster: &mut Cluster, image_dir: PathBuf) -> Result<String> {
    let image = Image::at(image_dir)?;
    cluster.publish_next(&image)?;
    let (next, _) = cluster.next_release.clone().context("no next release")?;
    eprintln!(
        "[cluster] rolling to release {} (Kubernetes {})",
        next.image_version, next.kubernetes
    );
    cluster.update_stack()?;
    let grace = Duration::from_secs(5 * 60);
    for (group, role) in [("MasterGroup", Role::Master), ("NodeGroup", Role::Node)] {
        for rolled in cluster.roll(group, role, grace, &[], &mut |_, _| Ok(()))? {
            eprintln!(
                "[cluster] {} replaced by {}",
                rolled.retired.id, rolled.new.id
            );
        }
    }
    cluster.release = next.clone();
    Ok(next.image_version)
}

fn main() -> Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: slipway-cluster DIR")?;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let image = Image::locate()?;
    let _ = std::fs::remove_file(dir.join("kubeconfig"));
    let mut cluster = Cluster::create(&image, Options::master_and_node(dir.clone()))?;
    cluster.launch_master_and_node()?;
    eprintln!(
        "[cluster] booting; under TCG this takes 5-15 minutes (consoles in {} once stopped)",
        vm_tests::vm_logs_dir().display()
    );
    let start = Instant::now();
    let kubeconfig = cluster.wait_for_ready_nodes(2, Duration::from_secs(45 * 60), || {
        STOP.load(Ordering::SeqCst)
    })?;
    std::fs::write(dir.join("ready"), kubeconfig.to_string_lossy().as_bytes())?;
    eprintln!(
        "[cluster] up in {:.0}s: master and node Ready",
        start.elapsed().as_secs_f64()
    );
    while !STOP.load(Ordering::SeqCst) {
        let request = dir.join("update-request");
        if let Ok(path) = std::fs::read_to_string(&request) {
            let _ = std::fs::remove_file(&request);
            match update(&mut cluster, PathBuf::from(path.trim())) {
                Ok(version) => {
                    eprintln!("[cluster] every member runs release {version}");
                    std::fs::write(dir.join("updated"), version)?;
                }
                Err(e) => {
                    eprintln!("[cluster] the update failed: {e:#}");
                    std::fs::write(dir.join("update-failed"), format!("{e:#}"))?;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("[cluster] stopping");
    let _ = std::fs::remove_file(dir.join("ready"));
    drop(cluster);
    Ok(())
}
