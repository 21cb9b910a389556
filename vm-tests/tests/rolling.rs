//! The harness's release update against moto, with no VM booted: the
//! stand-in the cluster test relies on for what moto's CloudFormation does
//! not do. Both releases are published, the stack is created from the
//! first and updated to the second; the harness's launch template versions
//! and groups then make every replacement come from the next release's AMI
//! with its tags, the policies read as the rendered template says, and the
//! master group never holds two masters.

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use vm_tests::cluster::{Cluster, Options, Role, REGION};
use vm_tests::Image;

#[test]
fn an_update_launches_from_the_next_release_as_the_policy_says_harness_stand_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = Options {
        next: Some(Image::locate_next()?),
        ..Options::master_and_node(dir.path().to_owned())
    };
    let mut cluster = Cluster::create(&Image::locate()?, opts)?;
    let (next, _) = cluster.next_release.clone().context("no next release")?;
    let next_ami = next.amis[REGION].clone();
    let before = cluster.instances()?;
    ensure!(
        before
            .iter()
            .all(|i| i.image != next_ami && i.release == cluster.release.image_version),
        "launched from the next release before the update: {before:?}"
    );

    cluster.update_stack()?;
    // Nothing is replaced by the update itself.
    ensure!(
        cluster
            .instances()?
            .iter()
            .map(|i| &i.id)
            .eq(before.iter().map(|i| &i.id)),
        "the update replaced instances by itself"
    );
    let master = cluster.rolling_update("MasterGroup")?;
    ensure!(
        (
            master.max_batch,
            master.min_in_service,
            master.wait_on_signals
        ) == (1, 0, true)
            && master.pause == Duration::from_secs(30 * 60),
        "{master:?}"
    );
    // The stack's one node, none kept in service: one at a time.
    let nodes = cluster.rolling_update("NodeGroup")?;
    ensure!(nodes.batch(1) == 1 && nodes.wait_on_signals, "{nodes:?}");

    // The master's batch: retired (no VM to power down here), replaced
    // from the next release, one master at a time.
    let old = before
        .iter()
        .find(|i| i.role == Role::Master)
        .context("no master")?
        .clone();
    let retired = cluster.retire(std::slice::from_ref(&old), Duration::from_secs(1))?;
    ensure!(retired.len() == 1 && retired[0].shutdown.is_none());
    let known: Vec<String> = before.iter().map(|i| i.id.clone()).collect();
    let new = cluster.replacement(Role::Master, &known, Duration::from_secs(60))?;
    ensure!(
        new.image == next_ami && new.release == next.image_version,
        "the replacement runs {} tagged {}, not {next_ami} tagged {}",
        new.image,
        new.release,
        next.image_version
    );
    let masters = cluster
        .instances()?
        .into_iter()
        .filter(|i| i.role == Role::Master)
        .count();
    ensure!(masters == 1, "{masters} masters");
    Ok(())
}
