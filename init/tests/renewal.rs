//! Certificate renewal through the secrets bucket, against a real moto: a
//! master that boots with a bundle near its end renews it and stores it
//! over the version it read; two masters renewing at once leave one bundle;
//! the daily renewal restarts the control plane in order (against a
//! stand-in for crictl, kubectl and systemctl that records the calls: the
//! restarts themselves are exercised in the VMs).

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::*;
use slipway_init::pki::{Bundle, Identity, Validity};
use slipway_init::steps::{renewal, secrets, Paths, Runner, StepError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};

fn identity() -> Identity {
    Identity {
        cluster_name: "demo".into(),
        api_name: "api.demo.slipway.internal".into(),
        master_ips: vec!["10.0.1.10".parse().unwrap(), "10.0.2.10".parse().unwrap()],
        public_ip: None,
        api_service_ip: "10.96.0.1".parse().unwrap(),
    }
}

/// Stores a bundle issued `days_ago` (leaves last a year) as the cluster's PKI.
async fn seed(w: &World, days_ago: i64) -> Bundle {
    seed_for(w, &identity(), days_ago).await
}

async fn seed_for(w: &World, id: &Identity, days_ago: i64) -> Bundle {
    let issued = OffsetDateTime::now_utc() - Duration::days(days_ago);
    let bundle = Bundle::generate_with(id, &Validity::at(issued)).unwrap();
    store(w, &bundle).await;
    bundle
}

/// Stores `bundle` as the cluster's PKI.
async fn store(w: &World, bundle: &Bundle) {
    w.aws
        .s3
        .put_object()
        .bucket(&w.bucket)
        .key(secrets::pki_key("demo"))
        .body(serde_json::to_vec(bundle).unwrap().into())
        .send()
        .await
        .unwrap();
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
    let status = renewal::status(&common::as_master(&ctx), OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert_eq!(status.matches("due for renewal").count(), 11, "{status}");
    assert!(status.contains("last renewal: never"), "{status}");
    let (report, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    assert!(report.changed, "{report:?}");
    assert!(
        report.detail.contains("renewed 11 certificates"),
        "{}",
        report.detail
    );

    let now = stored_bundle(&w).await;
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
    let (report, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(bundle, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_far_from_their_end_are_kept_and_an_old_token_replaced() {
    let w = world(1).await;
    let old = seed(&w, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let (report, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    assert!(report.changed, "{report:?}");
    assert!(!report.detail.contains("renewed"), "{}", report.detail);
    assert!(
        report.detail.contains("replaced bootstrap token"),
        "{}",
        report.detail
    );
    assert_eq!(serials(&bundle), serials(&old));
    assert_ne!(
        bundle.get("bootstrap-token").unwrap(),
        old.get("bootstrap-token").unwrap()
    );
    let expires = bundle.token_expiry().unwrap().unwrap();
    let left = expires - OffsetDateTime::now_utc();
    assert!(
        left > Duration::hours(23) && left <= Duration::hours(24),
        "{left}"
    );
    assert_eq!(stored_bundle(&w).await, bundle);
    // Nodes get the new token too.
    let node: Bundle =
        serde_json::from_slice(&object(&w, &secrets::node_key("demo")).await.unwrap()).unwrap();
    assert_eq!(node.token_expires, bundle.token_expires);
    assert_eq!(
        node.get("bootstrap-kubelet.conf").unwrap(),
        bundle.get("bootstrap-kubelet.conf").unwrap()
    );
    // Within its first half-life, nothing changes at the next boot.
    let (report, again) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(again, bundle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_while_its_token_is_expired_and_joins_with_the_next() {
    let w = world(1).await;
    let old = seed(&w, 3).await;
    let publish = |b: &Bundle| {
        let body = serde_json::to_vec(&b.node_bundle().unwrap()).unwrap();
        w.aws
            .s3
            .put_object()
            .bucket(&w.bucket)
            .key(secrets::node_key("demo"))
            .body(body.into())
            .send()
    };
    publish(&old).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "node", 0, dir.path());
    // Nobody replaces it: the node fails at its deadline, saying why.
    let err = secrets::node(&ctx, std::time::Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has not expired"), "{err}");
    // A master replaces it while the node waits.
    let fresh = old
        .rotate_token(OffsetDateTime::now_utc(), Duration::hours(24))
        .unwrap()
        .unwrap()
        .bundle;
    let (got, ()) = tokio::join!(
        secrets::node(&ctx, std::time::Duration::from_secs(30)),
        async {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            publish(&fresh).await.unwrap();
        }
    );
    let (report, bundle) = got.unwrap();
    assert_eq!(
        bundle.get("bootstrap-kubelet.conf").unwrap(),
        fresh.get("bootstrap-kubelet.conf").unwrap()
    );
    assert!(report.detail.contains("token expires"), "{}", report.detail);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("pki/bootstrap-kubelet.conf")).unwrap(),
        fresh.get("bootstrap-kubelet.conf").unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_renewing_at_once_leave_one_consistent_bundle() {
    let w = world(2).await;
    let old = seed(&w, 340).await;
    let [(ra, ba, a), (rb, bb, b)] = two_masters_at_once(&w).await;
    // Whatever the interleaving, one renewal was stored and both use it.
    assert_eq!(
        u8::from(ra.changed) + u8::from(rb.changed),
        1,
        "{ra:?} / {rb:?}"
    );
    let now = stored_bundle(&w).await;
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

/// crictl, kubectl and systemctl as a running master answers them: each
/// component runs one container, and a stopped one is replaced by kubelet
/// with a new ID. Records every call.
#[derive(Debug, Clone, Default)]
struct ControlPlane {
    containers: Arc<Mutex<BTreeMap<String, u32>>>,
    calls: Arc<Mutex<Vec<String>>>,
    /// The runtime fails the next `crictl stop` of this component's
    /// container (a run dying halfway).
    fail_stop_of: Arc<Mutex<Option<&'static str>>>,
    /// The API server answers `/readyz` with an error while this is set
    /// (one slow to get ready after its restart).
    not_ready: Arc<Mutex<bool>>,
}

impl Runner for ControlPlane {
    fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        _: Option<&std::path::Path>,
    ) -> Result<String, StepError> {
        let mut containers = self.containers.lock().unwrap();
        let line = match (program, args) {
            ("crictl", [_, _, "ps", .., name, "--quiet"]) => {
                let name = name.trim_start_matches('^').trim_end_matches('$');
                let n = containers.entry(name.to_owned()).or_insert(1);
                return Ok(format!("{name}-{n}\n"));
            }
            ("crictl", [_, _, "stop", .., id])
                if self
                    .fail_stop_of
                    .lock()
                    .unwrap()
                    .take_if(|name| id.rsplit_once('-').map(|(n, _)| n) == Some(*name))
                    .is_some() =>
            {
                return Err(StepError::Invalid {
                    what: "crictl stop".into(),
                    message: "the runtime went away".into(),
                });
            }
            ("crictl", [_, _, "stop", "--timeout", _, id]) => {
                let (name, _) = id.rsplit_once('-').unwrap();
                *containers.get_mut(name).unwrap() += 1;
                format!("stop {id}")
            }
            ("kubectl", [.., "get", "--raw=/readyz"]) if *self.not_ready.lock().unwrap() => {
                self.calls.lock().unwrap().push("readyz refused".into());
                return Err(StepError::Invalid {
                    what: "kubectl get --raw=/readyz".into(),
                    message: "the API server is not ready".into(),
                });
            }
            ("kubectl", [.., "get", "--raw=/readyz"]) => "readyz".to_owned(),
            ("kubectl", [.., "-f", file]) => format!("apply {}", file.rsplit('/').next().unwrap()),
            ("kubectl", [.., "get", "secrets", _, _]) => {
                self.calls.lock().unwrap().push("list tokens".into());
                return Ok(r#"{"items": []}"#.into());
            }
            ("systemctl", ["restart", unit]) => format!("restart {unit}"),
            _ => panic!("unexpected call: {program} {args:?}"),
        };
        self.calls.lock().unwrap().push(line);
        Ok(String::new())
    }
}

/// A master's context below `root` whose control plane is a
/// [`ControlPlane`], with a bundle issued 300 days ago (its leaves are due)
/// for the master's real Elastic IP.
async fn running_master(
    w: &World,
    root: &std::path::Path,
) -> (slipway_init::steps::Context, ControlPlane, Bundle) {
    let (_, eip) = eip_holder(w).await;
    let mut id = identity();
    id.public_ip = Some(eip.parse().unwrap());
    let old = seed_for(w, &id, 300).await;
    let plane = ControlPlane::default();
    let mut ctx = context(w, "master", 0, root);
    ctx.paths = Paths {
        manifests: manifests_dir(),
        ..Paths::under(root)
    };
    ctx.runner = Box::new(plane.clone());
    (ctx, plane, old)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_renewal_restarts_the_control_plane_in_order_stand_in_runtime() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let (ctx, plane, old) = running_master(&w, root.path()).await;

    let report = renewal::run(&common::as_master(&ctx)).await.unwrap();
    assert!(report.changed, "{report:?}");
    assert_eq!(
        *plane.calls.lock().unwrap(),
        [
            // The token, a year old, is long expired: its successor first.
            "apply 10-bootstrap.yaml",
            "list tokens",
            "stop etcd-1",
            "stop kube-apiserver-1",
            "readyz",
            "stop kube-controller-manager-1",
            "stop kube-scheduler-1",
            "restart kubelet.service",
        ]
    );
    let now = stored_bundle(&w).await;
    assert_ne!(serials(&now), serials(&old));
    // The renewed files are where the static pods read them.
    let pki = ctx.paths.secrets.join("pki");
    assert_eq!(
        std::fs::read_to_string(pki.join("apiserver.crt")).unwrap(),
        now.get("apiserver.crt").unwrap()
    );
    assert!(ctx
        .paths
        .etc
        .join("kubernetes/manifests/etcd.yaml")
        .exists());

    let status = renewal::status(&common::as_master(&ctx), OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert_eq!(status.matches("  ok\n").count(), 12, "{status}");
    assert_eq!(status.matches("  CA\n").count(), 3, "{status}");
    assert!(
        status.contains(&format!(
            "expires {}",
            now.token_expires.as_deref().unwrap()
        )),
        "{status}"
    );
    assert!(status.contains("kubelet.conf (this master)"), "{status}");
    assert!(
        status.contains(&format!(
            "last renewal: {}",
            now.renewed.as_deref().unwrap()
        )),
        "{status}"
    );

    // The next day nothing is due and nothing restarts.
    plane.calls.lock().unwrap().clear();
    let report = renewal::run(&common::as_master(&ctx)).await.unwrap();
    assert!(!report.changed, "{report:?}");
    assert!(plane.calls.lock().unwrap().is_empty());
    assert_eq!(stored_bundle(&w).await, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_has_no_masters_view_to_renew_with() {
    // The renewal takes a master's view; a node's context has none (its
    // `slipway-init renew` says there is nothing to renew and stops).
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let ctx = context(&w, "node", 0, root.path());
    let err = slipway_init::steps::Master::of(&ctx).unwrap_err();
    assert!(err.to_string().contains("only a master"), "{err}");
    // Work both roles do finds no master's view on a node either.
    assert!(slipway_init::steps::Master::if_master(&ctx)
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_died_before_the_restarts_is_finished_by_the_next_run() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let (ctx, plane, _) = running_master(&w, root.path()).await;
    *plane.fail_stop_of.lock().unwrap() = Some("etcd");
    let err = renewal::run(&common::as_master(&ctx)).await.unwrap_err();
    assert!(err.to_string().contains("the runtime went away"), "{err}");
    let renewed = stored_bundle(&w).await;
    assert!(renewed.renewed.is_some(), "the bucket holds the renewal");

    // The bucket has nothing due any more; the restarts are still owed.
    plane.calls.lock().unwrap().clear();
    let report = renewal::run(&common::as_master(&ctx)).await.unwrap();
    assert!(report.changed, "{report:?}");
    let calls = plane.calls.lock().unwrap().clone();
    assert_eq!(
        calls[..2],
        ["stop etcd-1", "stop kube-apiserver-1"],
        "{calls:?}"
    );
    assert_eq!(stored_bundle(&w).await, renewed);
    // And then nothing is owed.
    plane.calls.lock().unwrap().clear();
    assert!(
        !renewal::run(&common::as_master(&ctx))
            .await
            .unwrap()
            .changed
    );
    assert!(plane.calls.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_died_halfway_through_the_restarts_goes_on_from_there() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let (ctx, plane, _) = running_master(&w, root.path()).await;
    *plane.fail_stop_of.lock().unwrap() = Some("kube-apiserver");
    let err = renewal::run(&common::as_master(&ctx)).await.unwrap_err();
    assert!(err.to_string().contains("the runtime went away"), "{err}");
    assert!(plane
        .calls
        .lock()
        .unwrap()
        .contains(&"stop etcd-1".to_owned()));

    // etcd already serves the new certificates: the next run starts at
    // the API server and never stops etcd again.
    plane.calls.lock().unwrap().clear();
    let report = renewal::run(&common::as_master(&ctx)).await.unwrap();
    assert!(report.changed, "{report:?}");
    let calls = plane.calls.lock().unwrap().clone();
    assert_eq!(
        stops(&calls),
        [
            "stop kube-apiserver-1",
            "stop kube-controller-manager-1",
            "stop kube-scheduler-1"
        ],
        "{calls:?}"
    );
}

/// The containers a renewal stopped, in order.
fn stops(calls: &[String]) -> Vec<&str> {
    calls
        .iter()
        .filter(|c| c.starts_with("stop "))
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_slow_to_get_ready_is_waited_for_again_never_restarted_again() {
    let w = world(1).await;
    let root = tempfile::tempdir().unwrap();
    let (mut ctx, plane, _) = running_master(&w, root.path()).await;
    ctx.deadlines.restart = std::time::Duration::from_secs(3);
    *plane.not_ready.lock().unwrap() = true;
    let err = renewal::run(&common::as_master(&ctx)).await.unwrap_err();
    assert!(err.to_string().contains("ready"), "{err}");
    let calls = plane.calls.lock().unwrap().clone();
    assert!(
        calls.contains(&"stop kube-apiserver-1".to_owned()),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.contains("controller-manager")),
        "{calls:?}"
    );

    // The API server was restarted and is only slow: the next run waits
    // for it again, stops nothing it already restarted, and goes on.
    plane.calls.lock().unwrap().clear();
    *plane.not_ready.lock().unwrap() = false;
    let report = renewal::run(&common::as_master(&ctx)).await.unwrap();
    assert!(report.changed, "{report:?}");
    let calls = plane.calls.lock().unwrap().clone();
    assert_eq!(
        stops(&calls),
        ["stop kube-controller-manager-1", "stop kube-scheduler-1"],
        "{calls:?}"
    );
    assert!(calls.contains(&"readyz".to_owned()), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_releases_bundle_gains_the_secrets_key_once_and_keeps_it() {
    let w = world(1).await;
    // A bundle as an older release stored it: no Secrets encryption key.
    let mut old =
        Bundle::generate_with(&identity(), &Validity::at(OffsetDateTime::now_utc())).unwrap();
    old.files.remove(slipway_init::pki::ENCRYPTION_KEY);
    store(&w, &old).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let (report, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    assert!(report.changed, "{report:?}");
    let key = bundle
        .get(slipway_init::pki::ENCRYPTION_KEY)
        .unwrap()
        .to_owned();
    assert_eq!(stored_bundle(&w).await, bundle, "the key is stored");
    assert_eq!(
        bundle.ca_fingerprint().unwrap(),
        old.ca_fingerprint().unwrap()
    );
    // The next boot keeps that key: a new one would leave Secrets unreadable.
    let again = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, again.path());
    let (report, bundle) = secrets::master(&common::as_master(&ctx), None)
        .await
        .unwrap();
    assert!(!report.changed, "{report:?}");
    assert_eq!(bundle.get(slipway_init::pki::ENCRYPTION_KEY).unwrap(), key);
}
