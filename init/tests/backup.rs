//! etcd backups through the secrets bucket, against a real moto with the
//! master's role enforced (its action names: moto evaluates no resource
//! or condition; the template's scoping of deletes to backups is checked
//! by the policy evaluator in `policies.rs`). etcd is a stand-in here: a
//! crictl that answers `endpoint status` with a revision and writes a file
//! for `snapshot save`, as etcdctl inside etcd's container does; the
//! snapshot of a real etcd is taken in the VMs.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::*;
use sha2::{Digest, Sha256};
use slipway_init::steps::{backup, Context, Runner, StepError};
use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};

/// etcd behind crictl: each snapshot holds the revision it was taken at,
/// and every write moves the revision on.
#[derive(Debug, Clone)]
struct Etcd {
    data: std::path::PathBuf,
    revision: Arc<Mutex<u64>>,
    snapshots: Arc<Mutex<usize>>,
}

impl Runner for Etcd {
    fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        _: Option<&std::path::Path>,
    ) -> Result<String, StepError> {
        assert_eq!(program, "crictl", "{args:?}");
        match args {
            [_, _, "ps", .., "^etcd$", "--quiet"] => Ok("etcd-1\n".into()),
            [_, _, "exec", "--sync", _, "etcd-1", "etcdctl", rest @ ..] => {
                assert!(rest.iter().any(|a| a.ends_with("healthcheck-client.key")));
                assert!(rest.iter().any(|a| a.starts_with("--dial-timeout=")));
                let mut revision = self.revision.lock().unwrap();
                if rest.ends_with(&["endpoint", "status", "--write-out=json"]) {
                    return Ok(format!(
                        "[{{\"Endpoint\":\"https://127.0.0.1:2379\",\"Status\":{{\"header\":{{\"revision\":{revision}}}}}}}]\n\n"
                    ));
                }
                // etcdctl bounds a snapshot by --command-timeout only when
                // it is given: the snapshot keeps crictl's exec timeout.
                assert!(
                    !rest.iter().any(|a| a.starts_with("--command-timeout")),
                    "{rest:?}"
                );
                let [.., "snapshot", "save", path] = rest else {
                    panic!("unexpected etcdctl call: {rest:?}");
                };
                let name = path.strip_prefix("/var/lib/etcd/").unwrap();
                std::fs::write(self.data.join(name), format!("etcd at {revision}")).unwrap();
                *revision += 100;
                *self.snapshots.lock().unwrap() += 1;
                Ok("Snapshot saved\n".into())
            }
            _ => panic!("unexpected call: crictl {args:?}"),
        }
    }
}

fn master(w: &World, root: &std::path::Path) -> (Context, Etcd) {
    let etcd = Etcd {
        data: root.join("etcd"),
        revision: Arc::new(Mutex::new(4242)),
        snapshots: Arc::default(),
    };
    std::fs::create_dir_all(&etcd.data).unwrap();
    let mut ctx = context(w, "master", 0, &root.join("secrets"));
    ctx.paths.etcd_data = etcd.data.clone();
    ctx.runner = Box::new(etcd.clone());
    (ctx, etcd)
}

fn at(rfc3339: &str) -> OffsetDateTime {
    OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_taken_when_due_checksummed_and_pruned_to_the_retention() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let (ctx, etcd) = master(&w, root.path());
    let now = at("2026-12-02T09:00:00Z");
    // Ten days of older backups, two a day: more than the default keeps
    // (the newest 8, and each day's newest for 7 days).
    for day in 1..=10i64 {
        for hour in [6i64, 18] {
            let t = now - Duration::days(day) + Duration::hours(hour - 9);
            put_backup(&w, t, 1, b"old", &sha256(b"old")).await;
        }
    }
    let report = backup::run(&common::as_master(&ctx), now, false)
        .await
        .unwrap();
    assert!(report.changed, "{report:?}");
    assert!(
        report.detail.contains("etcd at revision 4242 to s3://")
            && report.detail.contains("past retention deleted"),
        "{}",
        report.detail
    );
    let listed = backup::list(&ctx).await.unwrap();
    let newest = listed.last().unwrap();
    assert_eq!(newest.key, "demo/etcd-backups/20261202T090000Z-r4242.db");
    assert_eq!(newest.revision, 4242);
    // The newest 8, and besides them the newest of each of the last 7
    // days: Nov 26 and 27 at 18:00. Nov 25 is past the 7 days.
    let kept: Vec<&str> = listed.iter().map(|b| &b.key[18..33]).collect();
    assert_eq!(
        kept,
        [
            "20261126T180000",
            "20261127T180000",
            "20261128T180000",
            "20261129T060000",
            "20261129T180000",
            "20261130T060000",
            "20261130T180000",
            "20261201T060000",
            "20261201T180000",
            "20261202T090000",
        ],
        "{kept:?}"
    );
    // What is stored is what etcd wrote, its sha256 beside it, and the
    // snapshot is gone from the data volume.
    let stored = object(&w, &newest.key).await.unwrap();
    assert_eq!(stored, b"etcd at 4242");
    let head = w
        .aws
        .s3
        .head_object()
        .bucket(&w.bucket)
        .key(&newest.key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata().unwrap().get("sha256"),
        Some(&sha256(b"etcd at 4242"))
    );
    assert!(!etcd.data.join(backup::SNAPSHOT_FILE).exists());

    // Not due 10 minutes later; due at 15, with the revision etcd is at.
    let report = backup::run(&common::as_master(&ctx), now + Duration::minutes(10), false)
        .await
        .unwrap();
    assert!(!report.changed, "{report:?}");
    assert!(report.detail.contains("10 min old"), "{}", report.detail);
    let report = backup::run(&common::as_master(&ctx), now + Duration::minutes(15), false)
        .await
        .unwrap();
    assert!(report.changed, "{report:?}");
    assert!(report.detail.contains("revision 4342"), "{}", report.detail);
    assert_eq!(*etcd.snapshots.lock().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_bytes_do_not_match_its_checksum_is_refused() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let (ctx, _) = master(&w, root.path());
    let now = at("2026-12-02T09:00:00Z");
    let good = put_backup(&w, now, 7, b"snapshot", &sha256(b"snapshot")).await;
    let bad = put_backup(
        &w,
        now + Duration::minutes(15),
        8,
        b"snapshoT",
        &sha256(b"snapshot"),
    )
    .await;
    let dest = root.path().join("restore.db");

    let err = backup::fetch(&ctx, &bad, &dest).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&bad)
            && message.contains(&sha256(b"snapshoT"))
            && message.contains(&sha256(b"snapshot"))
            && message.contains("refused"),
        "{message}"
    );
    assert!(!dest.exists());

    let fetched = backup::fetch(&ctx, &good, &dest).await.unwrap();
    assert_eq!((fetched.revision, fetched.size), (7, 8));
    assert_eq!(std::fs::read(&dest).unwrap(), b"snapshot");
    // A key that is not one of this cluster's backups is not fetched.
    let err = backup::fetch(&ctx, "demo/pki.json", &dest)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a backup"), "{err}");
}
