//! Certificate renewal through the secrets bucket, against a real moto: a
//! master that boots with a bundle near its end renews it and stores it
//! over the version it read; two masters renewing at once leave one bundle.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::*;
use slipway_init::pki::{Bundle, Identity, Validity};
use slipway_init::steps::secrets;
use time::{Duration, OffsetDateTime};

fn identity() -> Identity {
    Identity {
        cluster_name: "demo".into(),
        master_ip: "10.0.1.10".parse().unwrap(),
        public_ip: None,
        api_service_ip: "10.96.0.1".parse().unwrap(),
    }
}

/// Stores a bundle issued `days_ago` (leaves last a year) as the cluster's PKI.
async fn seed(w: &World, days_ago: i64) -> Bundle {
    let issued = OffsetDateTime::now_utc() - Duration::days(days_ago);
    let bundle = Bundle::generate_with(&identity(), &Validity::at(issued)).unwrap();
    w.aws
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key(secrets::pki_key("demo"))
        .body(serde_json::to_vec(&bundle).unwrap().into())
        .send()
        .await
        .unwrap();
    bundle
}

async fn stored(w: &World) -> Bundle {
    let bytes = object(w, &secrets::pki_key("demo")).await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn serials(b: &Bundle) -> Vec<(String, String)> {
    b.certificates()
        .unwrap()
        .into_iter()
        .map(|c| (c.file, c.serial))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_renews_a_bundle_inside_the_window_and_stores_it() {
    let w = world(1).await;
    let old = seed(&w, 335).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let (report, bundle) = secrets::master(&ctx, None).await.unwrap();
    assert!(report.changed, "{report:?}");
    assert!(
        report.detail.contains("renewed 11 certificates"),
        "{}",
        report.detail
    );

    let now = stored(&w).await;
    assert_eq!(now, bundle, "the bucket holds what this master uses");
    assert_eq!(now.ca_fingerprint().unwrap(), old.ca_fingerprint().unwrap());
    assert!(now.renewed.is_some());
    let (before, after) = (serials(&old), serials(&now));
    for ((file, old_serial), (_, new_serial)) in before.iter().zip(&after) {
        if file.contains("ca.crt") {
            assert_eq!(old_serial, new_serial, "{file}: a CA changed");
        } else {
            assert_ne!(old_serial, new_serial, "{file}: not renewed");
        }
    }
    // The tmpfs holds the renewed files, and the bucket's admin.conf is the
    // renewed one.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("pki/apiserver.crt")).unwrap(),
        now.get("apiserver.crt").unwrap()
    );
    let admin = object(&w, &secrets::admin_key("demo")).await.unwrap();
    assert_eq!(admin, now.get("admin.conf").unwrap().as_bytes());

    // The next boot finds nothing due and writes nothing.
    let again = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, again.path());
    let (report, bundle) = secrets::master(&ctx, None).await.unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(bundle, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_far_from_its_end_is_left_as_it_is() {
    let w = world(1).await;
    let old = seed(&w, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let (report, bundle) = secrets::master(&ctx, None).await.unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(bundle, old);
    assert_eq!(stored(&w).await, old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_renewing_at_once_leave_one_consistent_bundle() {
    let w = world(2).await;
    let old = seed(&w, 340).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca = context(&w, "master", 0, a.path());
    let cb = context(&w, "master", 1, b.path());
    let (ra, rb) = tokio::join!(secrets::master(&ca, None), secrets::master(&cb, None));
    let (ra, ba) = ra.unwrap();
    let (rb, bb) = rb.unwrap();
    // Whatever the interleaving, one renewal was stored and both use it.
    assert_eq!(
        u8::from(ra.changed) + u8::from(rb.changed),
        1,
        "{ra:?} / {rb:?}"
    );
    let now = stored(&w).await;
    assert_eq!(ba, now);
    assert_eq!(bb, now);
    assert_ne!(serials(&now), serials(&old));
    assert_eq!(now.ca_fingerprint().unwrap(), old.ca_fingerprint().unwrap());
    for dir in [a.path(), b.path()] {
        assert_eq!(
            std::fs::read_to_string(dir.join("pki/etcd/server.crt")).unwrap(),
            now.get("etcd/server.crt").unwrap()
        );
    }
}
