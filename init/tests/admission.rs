//! Node admission against moto: the approver finds this cluster's running
//! instances by their tags, and decides certificate requests by them
//! (joins, serving certificates, kubelets' own renewals). The
//! API server is a stand-in here (lists handed to the pass, and a
//! recorder of the approvals, denials, signatures and deletions the pass
//! writes, named in the test); the cluster test runs the approver against
//! a real one.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use aws_sdk_ec2::types::Tag;
use common::*;
use slipway_init::steps::approver::{self, Verdict, CLIENT_SIGNER, CSRS, SERVING_SIGNER};
use slipway_init::steps::StepError;
use std::sync::{Arc, Mutex};

async fn tag(w: &World, instance: usize, cluster: &str, role: &str) {
    w.aws
        .ec2
        .create_tags()
        .resources(&w.instances[instance].id)
        .tags(Tag::builder().key("slipway:cluster").value(cluster).build())
        .tags(Tag::builder().key("slipway:role").value(role).build())
        .send()
        .await
        .unwrap();
}

/// The approver's writes to the API server, recorded: the method, the
/// path and the body.
#[derive(Debug, Clone, Default)]
struct Api {
    calls: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl Api {
    fn record(&self, method: &str, path: &str, body: &serde_json::Value) -> Result<(), StepError> {
        let call = format!("{method} {path}");
        self.calls.lock().unwrap().push((call, body.clone()));
        Ok(())
    }

    /// Each write as `<method> <path>`, with the condition a decision adds.
    fn shown(&self) -> Vec<String> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .map(
                |(call, body)| match body["status"]["conditions"].as_array() {
                    Some(c) => format!("{call} {}", c.last().unwrap()["type"].as_str().unwrap()),
                    None => call.clone(),
                },
            )
            .collect()
    }

    fn body(&self, index: usize) -> serde_json::Value {
        self.calls.lock().unwrap()[index].1.clone()
    }
}

impl approver::Writes for Api {
    async fn put(&self, path: &str, object: &serde_json::Value) -> Result<(), StepError> {
        self.record("PUT", path, object)
    }

    async fn merge_patch(&self, path: &str, patch: &serde_json::Value) -> Result<(), StepError> {
        self.record("PATCH", path, patch)
    }

    async fn delete(&self, path: &str) -> Result<(), StepError> {
        self.record("DELETE", path, &serde_json::Value::Null)
    }
}

/// A CSR object as the API lists it: `cn` asked for by `username`.
fn csr(name: &str, signer: &str, username: &str, cn: &str, ips: &[&str]) -> serde_json::Value {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = slipway_init::pki::subject(cn, &["system:nodes"]);
    p.subject_alt_names = ips
        .iter()
        .map(|ip| rcgen::SanType::IpAddress(ip.parse().unwrap()))
        .collect();
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    use base64::Engine;
    let usage = if signer == CLIENT_SIGNER {
        "client auth"
    } else {
        "server auth"
    };
    serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": signer,
            "username": username,
            "usages": ["digital signature", usage],
        },
        "status": {},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_this_clusters_running_instances_by_tag() {
    let w = world(3).await;
    tag(&w, 0, "demo", "node").await;
    tag(&w, 1, "other", "node").await;
    tag(&w, 2, "demo", "node").await;
    w.aws
        .ec2
        .terminate_instances()
        .instance_ids(&w.instances[2].id)
        .send()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let members = approver::members(&common::as_master(&ctx)).await.unwrap();
    let ids: Vec<&String> = members.keys().collect();
    assert_eq!(ids, [&w.instances[0].id], "{members:?}");
    let me = &members[&w.instances[0].id];
    assert!(me.node);
    let ip: std::net::IpAddr = private_ip(&w, 0).await.parse().unwrap();
    assert!(me.addresses.contains(&ip), "{me:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_decided_by_what_ec2_says_stand_in_api_server() {
    let w = world(2).await;
    tag(&w, 0, "demo", "node").await;
    tag(&w, 1, "other", "node").await;
    let (mine, foreign) = (&w.instances[0].id, &w.instances[1].id);
    let ip = private_ip(&w, 0).await;
    let boot = "system:bootstrap:abcdef";
    let node = format!("system:node:{mine}");
    let list = serde_json::json!({"items": [
        csr("join", CLIENT_SIGNER, boot, &node, &[]),
        csr("foreign", CLIENT_SIGNER, boot, &format!("system:node:{foreign}"), &[]),
        csr("master", CLIENT_SIGNER, boot, "system:node:ip-10-0-1-10", &[]),
        csr("serve", SERVING_SIGNER, &node, &node, &[&ip]),
        csr("serve-other", SERVING_SIGNER, &node, &node, &["10.9.9.9"]),
        csr("renew", CLIENT_SIGNER, &node, &node, &[]),
    ]});
    let api = Api::default();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    // The master's CA, which signs the approved client requests.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name = slipway_init::pki::subject("kubernetes", &[]);
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_crt = ca.self_signed(&ca_key).unwrap();
    let pki = ctx.paths.secrets.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("ca.crt"), ca_crt.pem()).unwrap();
    std::fs::write(pki.join("ca.key"), ca_key.serialize_pem()).unwrap();
    let decided = approver::once(&common::as_master(&ctx), &api, &list.to_string())
        .await
        .unwrap();
    let verdicts: Vec<(&str, bool)> = decided
        .iter()
        .map(|(n, v)| (n.as_str(), matches!(v, Verdict::Approve(_))))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("join", true),
            ("foreign", false),
            ("master", false),
            ("serve", true),
            ("serve-other", false),
            ("renew", true),
        ]
    );
    // Each decision replaces the request's approval with its condition
    // added; each approved client request is signed here too, its
    // certificate set through the status subresource; serving ones are
    // left to the controller manager.
    assert_eq!(
        api.shown(),
        [
            format!("PUT {CSRS}/join/approval Approved"),
            format!("PATCH {CSRS}/join/status"),
            format!("PUT {CSRS}/foreign/approval Denied"),
            format!("PUT {CSRS}/master/approval Denied"),
            format!("PUT {CSRS}/serve/approval Approved"),
            format!("PUT {CSRS}/serve-other/approval Denied"),
            format!("PUT {CSRS}/renew/approval Approved"),
            format!("PATCH {CSRS}/renew/status"),
        ]
    );
    // The request goes back as listed, its spec untouched, with why.
    let approval = api.body(0);
    assert_eq!(approval["spec"], list["items"][0]["spec"]);
    assert_eq!(approval["metadata"]["name"], "join");
    let condition = &approval["status"]["conditions"][0];
    assert_eq!(condition["reason"], approver::REASON);
    assert!(!condition["message"].as_str().unwrap().is_empty());
    let body = api.body(1);
    let pem = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        body["status"]["certificate"].as_str().unwrap(),
    )
    .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let ca_der = ca_crt.der().to_vec();
    let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    cert.verify_signature(Some(ca_parsed.public_key())).unwrap();
    assert_eq!(cert.issuer(), ca_parsed.subject());
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), node);
    let org = cert.subject().iter_organization().next().unwrap();
    assert_eq!(org.as_str().unwrap(), "system:nodes");
    assert!(cert.subject_alternative_name().unwrap().is_none());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth, "{eku:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_left_unsigned_without_the_ca_is_still_approved_stand_in_api_server() {
    let w = world(1).await;
    tag(&w, 0, "demo", "node").await;
    let node = format!("system:node:{}", w.instances[0].id);
    let list = serde_json::json!({"items": [
        csr("join", CLIENT_SIGNER, "system:bootstrap:abcdef", &node, &[]),
    ]});
    let api = Api::default();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let decided = approver::once(&common::as_master(&ctx), &api, &list.to_string())
        .await
        .unwrap();
    assert!(
        matches!(decided[..], [(_, Verdict::Approve(_))]),
        "{decided:?}"
    );
    assert_eq!(api.shown(), [format!("PUT {CSRS}/join/approval Approved")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_of_instances_ec2_no_longer_has_are_swept_stand_in_api_server() {
    let w = world(4).await;
    for i in 0..3 {
        tag(&w, i, "demo", "node").await;
    }
    // Another cluster's running instance does not count as this one's.
    tag(&w, 3, "other", "node").await;
    let id = |i: usize| w.instances[i].id.clone();
    w.aws
        .ec2
        .terminate_instances()
        .instance_ids(id(1))
        .send()
        .await
        .unwrap();
    w.aws
        .ec2
        .stop_instances()
        .instance_ids(id(2))
        .send()
        .await
        .unwrap();
    let never = "i-0fffffffffffffff0".to_owned();
    let not_ready = |name: &str| {
        serde_json::json!({
            "metadata": {"name": name},
            "status": {"conditions": [
                {"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ]},
        })
    };
    let list = serde_json::json!({"items": [
        not_ready(&id(0)), not_ready(&id(1)), not_ready(&id(2)), not_ready(&id(3)),
        not_ready(&never), not_ready("ip-10-0-1-10"),
    ]});
    let api = Api::default();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(&w, "master", 0, dir.path());
    let mut deleted = approver::sweep(
        &common::as_master(&ctx),
        &api,
        &list.to_string(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    deleted.sort();
    // Terminated, another cluster's (not this cluster's instance) and
    // never known go; running and stopped stay, and the master's.
    let mut expected = vec![id(1), id(3), never];
    expected.sort();
    assert_eq!(deleted, expected);
    let mut calls = api.shown();
    calls.sort();
    let nodes: Vec<String> = expected
        .iter()
        .map(|n| format!("DELETE /api/v1/nodes/{n}"))
        .collect();
    assert_eq!(calls, nodes);
}
