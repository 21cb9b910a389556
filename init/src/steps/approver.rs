//! Node admission: the master's approver (`slipway-init approve`, a loop
//! under systemd) decides every pending kubelet certificate request by
//! what EC2 says of this cluster's instances, instead of approving every
//! holder of the bootstrap token.
//!
//! - A **client** certificate for a kubelet (`kube-apiserver-client-kubelet`)
//!   asked for by a bootstrapper is approved only for `system:node:<id>`
//!   where `<id>` is a running (or pending) instance of this cluster's node
//!   group; never for the master's name. A kubelet renewing its own client
//!   certificate (`system:node:<name>` asking for itself) is approved while
//!   it is still a running member, so a terminated node's credentials stop
//!   at their end.
//! - A **serving** certificate (`kubelet-serving`) is approved only when the
//!   node asks for itself and names nothing but that instance's addresses
//!   as EC2 reports them (its private IPs and private DNS name, and the node
//!   name itself).
//! - Anything else for those signers is denied, with the reason in the
//!   journal; requests for other signers are not this approver's business.
//! - An approved client request is also signed here, with the cluster CA
//!   the master holds, as the controller manager's signer would sign it:
//!   a joining node need not wait for the controller manager to start
//!   ([`sign`]). Serving certificates are left to the controller manager.
//!
//! Members are found by the tags the launch templates put on every
//! instance (`slipway:cluster`, `slipway:role`).
//!
//! The approver also sweeps away the Nodes of instances that are gone
//! ([`sweep`]): a node lost with its zone never leaves, and etcd restored
//! from a backup brings back the Nodes of instances terminated since.
//! Nothing else deletes them (there is no cloud controller manager).

use super::{aws_err, Context, Master, StepError};
use crate::render::master_node_name;
use aws_sdk_ec2::types::{Filter, Instance};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const STEP: &str = "approve";
/// The AWS actions the approver calls.
pub const CALLS: &[&str] = &["ec2:DescribeInstances"];

pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
pub const SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
const NODE_PREFIX: &str = "system:node:";

/// A pending certificate signing request, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub signer: String,
    /// Who asked (`system:bootstrap:<token-id>`, `system:node:<name>`).
    pub username: String,
    pub usages: Vec<String>,
    /// The PKCS#10 request, PEM.
    pub pem: String,
    /// The request as listed, which a decision sends back with its
    /// condition added (the resource version included, so a request
    /// changed since the list is refused and decided again next pass).
    pub object: serde_json::Value,
}

/// The approver's writes to the API server: the master's own, in-process
/// ([`super::addons::LocalApi`]); the tests record them instead.
pub trait Writes {
    /// Replaces the object at `path` by `object`.
    fn put(
        &self,
        path: &str,
        object: &serde_json::Value,
    ) -> impl std::future::Future<Output = Result<(), StepError>> + Send;
    /// Merges `patch` into the object at `path`.
    fn merge_patch(
        &self,
        path: &str,
        patch: &serde_json::Value,
    ) -> impl std::future::Future<Output = Result<(), StepError>> + Send;
    /// Deletes the object at `path`, if it is there.
    fn delete(&self, path: &str)
        -> impl std::future::Future<Output = Result<(), StepError>> + Send;
}

impl Writes for super::addons::LocalApi {
    async fn put(&self, path: &str, object: &serde_json::Value) -> Result<(), StepError> {
        super::addons::LocalApi::put(self, path, object)
            .await
            .map(drop)
    }

    async fn merge_patch(&self, path: &str, patch: &serde_json::Value) -> Result<(), StepError> {
        super::addons::LocalApi::merge_patch(self, path, patch)
            .await
            .map(drop)
    }

    async fn delete(&self, path: &str) -> Result<(), StepError> {
        super::addons::LocalApi::delete(self, path).await.map(drop)
    }
}

/// What the approver does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Approve(String),
    Deny(String),
    /// Not for a kubelet signer.
    Leave,
}

/// An instance of this cluster, by the node name its kubelet uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Member {
    pub node: bool,
    pub addresses: BTreeSet<IpAddr>,
    pub dns: BTreeSet<String>,
}

/// This cluster's instances that may hold a kubelet certificate, by node
/// name: nodes by instance ID, the master by its stable-IP name.
pub type Members = BTreeMap<String, Member>;

/// What a request asks for, read from its PKCS#10 body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Asked {
    common_name: String,
    organizations: Vec<String>,
    ips: Vec<IpAddr>,
    dns: Vec<String>,
}

fn asked(pem: &str) -> Result<Asked, String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| format!("not a certificate request: {e}"))?;
    csr.verify_signature()
        .map_err(|e| format!("its signature does not verify: {e}"))?;
    let subject = &csr.certification_request_info.subject;
    let text = |v: &x509_parser::x509::AttributeTypeAndValue<'_>| {
        v.as_str().map(str::to_owned).unwrap_or_default()
    };
    let mut out = Asked {
        common_name: subject.iter_common_name().map(text).collect(),
        organizations: subject.iter_organization().map(text).collect(),
        ..Asked::default()
    };
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(d) => out.dns.push((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => out
                            .ips
                            .push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                        16 => out
                            .ips
                            .push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                        _ => return Err("an IP address SAN of odd length".into()),
                    },
                    other => return Err(format!("a SAN of an unexpected kind ({other:?})")),
                }
            }
        }
    }
    Ok(out)
}

/// The usages a kubelet's client and serving requests may ask for.
const CLIENT_USAGES: &[&str] = &["digital signature", "key encipherment", "client auth"];
const SERVING_USAGES: &[&str] = &["digital signature", "key encipherment", "server auth"];

/// Whether `usages` are all in `allowed` and include `needed`.
fn usages_ok(usages: &[String], allowed: &[&str], needed: &str) -> bool {
    usages.iter().all(|u| allowed.contains(&u.as_str())) && usages.iter().any(|u| u == needed)
}

/// The decision for one request (see the module's comment). `master` is
/// the master's node name.
pub fn judge(req: &Request, members: &Members, master: &str) -> Verdict {
    let client = req.signer == CLIENT_SIGNER;
    if !client && req.signer != SERVING_SIGNER {
        return Verdict::Leave;
    }
    let asked = match asked(&req.pem) {
        Ok(a) => a,
        Err(e) => return Verdict::Deny(format!("the request is unreadable: {e}")),
    };
    let Some(name) = asked.common_name.strip_prefix(NODE_PREFIX) else {
        return Verdict::Deny(format!(
            "it asks for {:?}, not a system:node:<name> identity",
            asked.common_name
        ));
    };
    if asked.organizations != ["system:nodes"] {
        return Verdict::Deny(format!(
            "it asks for the groups {:?}, not just system:nodes",
            asked.organizations
        ));
    }
    let member = members.get(name);
    let itself = req.username == format!("{NODE_PREFIX}{name}");
    if client && itself {
        if !usages_ok(&req.usages, CLIENT_USAGES, "client auth") {
            return Verdict::Deny(format!("unexpected usages {:?}", req.usages));
        }
        return match member {
            Some(_) => Verdict::Approve(format!(
                "{name} renews its own client certificate and is still running"
            )),
            None => Verdict::Deny(format!(
                "{name} is no longer a running instance of this cluster"
            )),
        };
    }
    if client {
        if !req.username.starts_with("system:bootstrap:") {
            return Verdict::Deny(format!(
                "{} is neither a bootstrapper nor the node itself",
                req.username
            ));
        }
        if name == master {
            return Verdict::Deny(format!("{name} is the master's name"));
        }
        if !usages_ok(&req.usages, CLIENT_USAGES, "client auth") {
            return Verdict::Deny(format!("unexpected usages {:?}", req.usages));
        }
        if !asked.ips.is_empty() || !asked.dns.is_empty() {
            return Verdict::Deny("a client certificate request names addresses".into());
        }
        return match member {
            Some(m) if m.node => Verdict::Approve(format!(
                "{name} is a running instance of this cluster's node group"
            )),
            _ => Verdict::Deny(format!(
                "{name} is not a running instance of this cluster's node group"
            )),
        };
    }
    // Serving: the node itself, for its own addresses.
    if !itself {
        return Verdict::Deny(format!(
            "{} asks for {name}'s serving certificate",
            req.username
        ));
    }
    let Some(member) = member else {
        return Verdict::Deny(format!("{name} is not a running instance of this cluster"));
    };
    if !usages_ok(&req.usages, SERVING_USAGES, "server auth") {
        return Verdict::Deny(format!("unexpected usages {:?}", req.usages));
    }
    if asked.ips.is_empty() && asked.dns.is_empty() {
        return Verdict::Deny("a serving certificate request names no address".into());
    }
    if let Some(ip) = asked.ips.iter().find(|ip| !member.addresses.contains(ip)) {
        return Verdict::Deny(format!("{ip} is not an address EC2 reports for {name}"));
    }
    if let Some(dns) = asked
        .dns
        .iter()
        .find(|d| d.as_str() != name && !member.dns.contains(*d))
    {
        return Verdict::Deny(format!("{dns} is not a name EC2 reports for {name}"));
    }
    Verdict::Approve(format!("{name} asks for its own addresses"))
}

/// This cluster's instances (by their `slipway:cluster` tag) in `states`.
async fn instances(ctx: &Context, states: &[&str]) -> Result<Vec<Instance>, StepError> {
    let cluster = &ctx.config.cluster_name;
    let mut found = Vec::new();
    let mut pages = ctx
        .aws
        .ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:slipway:cluster")
                .values(cluster)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(states.iter().map(|s| (*s).to_owned()).collect()))
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_err(
            "ec2:DescribeInstances",
            format!("listing the instances of cluster {cluster}"),
        ))?;
        found.extend(
            page.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .cloned(),
        );
    }
    Ok(found)
}

/// This cluster's running and pending instances, from EC2 by their tags.
pub async fn members(ctx: &Master<'_>) -> Result<Members, StepError> {
    let master_ip = ctx.ip;
    let master = master_node_name(master_ip);
    let mut members = Members::new();
    for instance in &instances(ctx, &["running", "pending"]).await? {
        let Some(id) = instance.instance_id() else {
            continue;
        };
        let role = instance
            .tags()
            .iter()
            .find(|t| t.key() == Some("slipway:role"))
            .and_then(|t| t.value());
        let mut m = Member {
            node: role == Some("node"),
            ..Member::default()
        };
        for eni in instance.network_interfaces() {
            for a in eni.private_ip_addresses() {
                m.addresses.extend(
                    a.private_ip_address()
                        .and_then(|ip| ip.parse::<IpAddr>().ok()),
                );
                m.dns.extend(a.private_dns_name().map(str::to_owned));
            }
        }
        m.addresses.extend(
            instance
                .private_ip_address()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
        m.dns.extend(instance.private_dns_name().map(str::to_owned));
        m.dns.retain(|d| !d.is_empty());
        match role {
            Some("node") => {
                members.insert(id.to_owned(), m);
            }
            Some("master") if m.addresses.contains(&IpAddr::V4(master_ip)) => {
                members.insert(master.clone(), m);
            }
            _ => {}
        }
    }
    Ok(members)
}

/// How long the Node of an instance EC2 no longer has must have been
/// NotReady before the sweep deletes it.
pub const SWEEP_AFTER: time::Duration = time::Duration::minutes(5);

/// Whether `name` is an EC2 instance ID, as nodes are named.
fn instance_named(name: &str) -> bool {
    name.strip_prefix("i-")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The Nodes in `kubectl get nodes -o json` output that the sweep may
/// delete: those `swept` names (named like an instance, or like a master
/// in another zone) and NotReady (Ready `False` or `Unknown`) since
/// [`SWEEP_AFTER`] before `now` at least. With how long, for the journal.
pub fn long_not_ready(
    json: &str,
    swept: impl Fn(&str) -> bool,
    now: OffsetDateTime,
) -> Result<Vec<(String, time::Duration)>, StepError> {
    let list: serde_json::Value = serde_json::from_str(json).map_err(|e| StepError::Invalid {
        what: "the API's Nodes".into(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for node in list["items"].as_array().into_iter().flatten() {
        let name = node["metadata"]["name"].as_str().unwrap_or_default();
        if !swept(name) {
            continue;
        }
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready");
        let Some(ready) = ready.filter(|c| c["status"] != "True") else {
            continue;
        };
        let since = ready["lastTransitionTime"]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
        if let Some(for_how_long) = since.map(|t| now - t).filter(|d| *d >= SWEEP_AFTER) {
            out.push((name.to_owned(), for_how_long));
        }
    }
    Ok(out)
}

/// This cluster's instances EC2 still has in any state but terminated: a
/// stopped node keeps its Node (it lifts its own cordon when started).
async fn existing_instances(ctx: &Context) -> Result<BTreeSet<String>, StepError> {
    let states = ["pending", "running", "shutting-down", "stopping", "stopped"];
    Ok(instances(ctx, &states)
        .await?
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect())
}

/// The Node names of the masters of the other zones: a master that ran
/// there before this one moved the cluster to this zone.
pub fn other_masters(ctx: &Master<'_>) -> Vec<String> {
    ctx.settings
        .addresses
        .values()
        .filter(|ip| **ip != ctx.ip)
        .map(|ip| master_node_name(*ip))
        .collect()
}

/// Deletes, once they have been NotReady for [`SWEEP_AFTER`], the Nodes of
/// instances EC2 no longer has (terminated, or unknown to it), and those
/// of the masters of other zones (the group runs one master, and it is
/// this one). EC2 is asked only when an instance's Node is a candidate.
/// Returns the Nodes deleted.
/// `nodes` is the Node list as the API server gives it ([`NODES`]).
pub async fn sweep(
    ctx: &Master<'_>,
    api: &impl Writes,
    nodes: &str,
    now: OffsetDateTime,
) -> Result<Vec<String>, StepError> {
    let masters = other_masters(ctx);
    let swept = |name: &str| instance_named(name) || masters.iter().any(|m| m == name);
    let candidates = long_not_ready(nodes, swept, now)?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let existing = if candidates.iter().any(|(n, _)| instance_named(n)) {
        existing_instances(ctx).await?
    } else {
        BTreeSet::new()
    };
    let mut deleted = Vec::new();
    for (node, for_how_long) in candidates {
        let why = if !instance_named(&node) {
            "a master of another zone, and this master has taken over"
        } else if existing.contains(&node) {
            continue;
        } else {
            "its instance is gone from EC2"
        };
        api.delete(&format!("{NODES}/{node}")).await?;
        tracing::warn!(
            step = STEP,
            "deleted node/{node}: NotReady for {}s and {why}",
            for_how_long.whole_seconds()
        );
        deleted.push(node);
    }
    Ok(deleted)
}

/// The pending requests in a request list.
pub fn pending(json: &str) -> Result<Vec<Request>, StepError> {
    let invalid = |message: String| StepError::Invalid {
        what: "the API's certificate signing requests".into(),
        message,
    };
    let list: serde_json::Value = serde_json::from_str(json).map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let decided = item["status"]["conditions"]
            .as_array()
            .is_some_and(|c| !c.is_empty());
        if decided {
            continue;
        }
        let spec = &item["spec"];
        let request = spec["request"].as_str().unwrap_or_default();
        let pem = crate::pki::b64_decode(request)
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        out.push(Request {
            name: item["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            signer: spec["signerName"].as_str().unwrap_or_default().to_owned(),
            username: spec["username"].as_str().unwrap_or_default().to_owned(),
            usages: spec["usages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect(),
            pem,
            object: item.clone(),
        });
    }
    Ok(out)
}

/// How often the approver looks for the add-ons step's word that the API
/// server answers.
const ANSWERED_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until this boot's add-ons step has seen the API server answer
/// (its [`super::addons::API_ANSWERED`] file): before that, no kubelet can
/// have asked for anything, and every pass would only be refused. Returns at
/// once when the API answered earlier in this boot (the approver
/// restarted).
pub async fn until_api_answered(ctx: &Context) {
    let answered = ctx.paths.run.join(super::addons::API_ANSWERED);
    if answered.exists() {
        return;
    }
    tracing::info!(
        step = STEP,
        "waiting for the add-ons step to see the API server answer"
    );
    let started = tokio::time::Instant::now();
    while !answered.exists() {
        tokio::time::sleep(ANSWERED_POLL).await;
    }
    tracing::info!(
        step = STEP,
        "the API server answers ({}s): deciding requests",
        started.elapsed().as_secs()
    );
}

/// The API paths of the lists a pass reads (in-process, through
/// [`super::addons::LocalApi`]).
pub const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
pub const NODES: &str = "/api/v1/nodes";

/// One pass: decides every pending request in `csrs`, the request list as
/// the API server gives it ([`CSRS`]), and writes each decision through
/// `api`. Returns what it decided.
pub async fn once(
    ctx: &Master<'_>,
    api: &impl Writes,
    csrs: &str,
) -> Result<Vec<(String, Verdict)>, StepError> {
    let requests = pending(csrs)?;
    let mine: Vec<&Request> = requests
        .iter()
        .filter(|r| r.signer == CLIENT_SIGNER || r.signer == SERVING_SIGNER)
        .collect();
    if mine.is_empty() {
        return Ok(Vec::new());
    }
    let members = members(ctx).await?;
    let master = master_node_name(ctx.ip);
    let now = OffsetDateTime::now_utc();
    let mut decided = Vec::new();
    for req in mine {
        let verdict = judge(req, &members, &master);
        let approval = format!("{CSRS}/{}/approval", req.name);
        match &verdict {
            Verdict::Approve(why) => {
                api.put(&approval, &decision(req, "Approved", why, now))
                    .await?;
                tracing::info!(
                    step = STEP,
                    "approved {} from {}: {why}",
                    req.name,
                    req.username
                );
                if req.signer == CLIENT_SIGNER {
                    sign(ctx, api, req).await;
                }
            }
            Verdict::Deny(why) => {
                api.put(&approval, &decision(req, "Denied", why, now))
                    .await?;
                tracing::warn!(
                    step = STEP,
                    "denied {} from {}: {why}",
                    req.name,
                    req.username
                );
            }
            Verdict::Leave => continue,
        }
        decided.push((req.name.clone(), verdict));
    }
    Ok(decided)
}

/// The reason a decision's condition carries (`kubectl describe csr`
/// shows it with the message, the verdict's why).
pub const REASON: &str = "SlipwayApprover";

/// `req` as listed, with the condition of `kind` (`Approved`, `Denied`)
/// added: the body of its `/approval` replacement.
pub fn decision(req: &Request, kind: &str, why: &str, now: OffsetDateTime) -> serde_json::Value {
    let mut object = req.object.clone();
    let at = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&Rfc3339)
        .unwrap_or_default();
    let condition = serde_json::json!({
        "type": kind,
        "status": "True",
        "reason": REASON,
        "message": why,
        "lastUpdateTime": at,
    });
    let status = &mut object["status"];
    if !status.is_object() {
        *status = serde_json::json!({});
    }
    match status["conditions"].as_array_mut() {
        Some(conditions) => conditions.push(condition),
        None => status["conditions"] = serde_json::json!([condition]),
    }
    object
}

/// Signs an approved kubelet client request with the cluster CA, as the
/// controller manager's signer would: on a first boot a node's kubelet
/// asks while the controller manager is still starting (under emulation
/// its Node registered 57 s after the API server was ready), and its Node,
/// its DaemonSet pods and so its Ready waited on that signer. Signing here
/// is only a head start: a request left unsigned (the CA unreadable, the
/// patch refused, the controller manager first) is the controller
/// manager's to sign, so a failure is logged and nothing more.
async fn sign(ctx: &Master<'_>, api: &impl Writes, req: &Request) {
    let read = |name: &str| {
        super::addons::read_pki(ctx, name).map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let signed = async {
        let (crt, key) = (read("ca.crt")?, read("ca.key")?);
        let validity = crate::pki::Validity::now();
        let pem = crate::pki::sign_kubelet_client(&req.pem, &crt, &key, &validity)?;
        let patch = serde_json::json!({"status": {"certificate": crate::pki::b64(pem)}});
        api.merge_patch(&format!("{CSRS}/{}/status", req.name), &patch)
            .await
    }
    .await;
    match signed {
        Ok(()) => tracing::info!(step = STEP, "signed {} with the cluster CA", req.name),
        Err(e) => tracing::info!(
            step = STEP,
            "{} not signed here, left to the controller manager's signer: {e}",
            req.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    const MASTER: &str = "ip-10-0-1-10";
    const NODE: &str = "i-0123456789abcdef0";

    #[tokio::test(start_paused = true)]
    async fn the_approver_starts_once_the_add_ons_step_saw_the_api_answer() {
        let dir = tempfile::tempdir().unwrap();
        let runner = Box::new(crate::steps::System);
        let ctx = crate::steps::test_context("master", runner, dir.path()).await;
        let answered = ctx.paths.run.join(crate::steps::addons::API_ANSWERED);
        let started = tokio::time::Instant::now();
        let waiting = until_api_answered(&ctx);
        let answering = async {
            tokio::time::sleep(std::time::Duration::from_secs(95)).await;
            std::fs::create_dir_all(&ctx.paths.run).unwrap();
            std::fs::write(&answered, b"").unwrap();
        };
        tokio::join!(waiting, answering);
        let waited = started.elapsed().as_secs();
        assert!((95..=97).contains(&waited), "{waited}");
        // An approver restarted later in the boot does not wait.
        let again = tokio::time::Instant::now();
        until_api_answered(&ctx).await;
        assert_eq!(again.elapsed().as_secs(), 0);
    }

    fn members() -> Members {
        let mut m = Members::new();
        m.insert(
            NODE.into(),
            Member {
                node: true,
                addresses: ["10.0.1.23".parse().unwrap()].into(),
                dns: ["ip-10-0-1-23.ec2.internal".to_owned()].into(),
            },
        );
        m.insert(
            MASTER.into(),
            Member {
                node: false,
                addresses: ["10.0.1.10".parse().unwrap(), "10.0.1.5".parse().unwrap()].into(),
                dns: BTreeSet::new(),
            },
        );
        m
    }

    #[test]
    fn only_long_not_ready_instance_nodes_are_sweep_candidates() {
        let now = OffsetDateTime::parse("2026-12-03T10:00:00Z", &Rfc3339).unwrap();
        let node = |name: &str, status: &str, since: &str| {
            serde_json::json!({
                "metadata": {"name": name},
                "status": {"conditions": [
                    {"type": "MemoryPressure", "status": "False", "lastTransitionTime": "2026-12-01T00:00:00Z"},
                    {"type": "Ready", "status": status, "lastTransitionTime": since},
                ]},
            })
        };
        let list = serde_json::json!({"items": [
            node("i-0aaaaaaaaaaaaaaa1", "Unknown", "2026-12-03T09:50:00Z"),
            node("i-0aaaaaaaaaaaaaaa2", "False", "2026-12-03T09:55:00Z"),
            node("i-0aaaaaaaaaaaaaaa3", "Unknown", "2026-12-03T09:58:00Z"),
            node("i-0aaaaaaaaaaaaaaa4", "True", "2026-12-03T08:00:00Z"),
            node(MASTER, "Unknown", "2026-12-03T08:00:00Z"),
            node("ip-10-0-2-10", "Unknown", "2026-12-03T09:54:00Z"),
            node("worker-1", "Unknown", "2026-12-03T08:00:00Z"),
            node("i-0aaaaaaaaaaaaaaa5", "Unknown", "not a time"),
        ]});
        let other_master = "ip-10-0-2-10";
        let swept = |n: &str| instance_named(n) || n == other_master;
        let found = long_not_ready(&list.to_string(), swept, now).unwrap();
        assert_eq!(
            found,
            [
                (
                    "i-0aaaaaaaaaaaaaaa1".to_owned(),
                    time::Duration::minutes(10)
                ),
                ("i-0aaaaaaaaaaaaaaa2".to_owned(), time::Duration::minutes(5)),
                ("ip-10-0-2-10".to_owned(), time::Duration::minutes(6)),
            ]
        );
        assert!(long_not_ready("not json", swept, now).is_err());
        assert!(!instance_named("i-"));
        assert!(!instance_named("i-xyz"));
    }

    /// A PKCS#10 request for `cn` in `orgs`, naming `sans`.
    fn csr(cn: &str, orgs: &[&str], sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = crate::pki::subject(cn, orgs);
        p.subject_alt_names = sans;
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn client(username: &str, name: &str) -> Request {
        Request {
            name: "csr-1".into(),
            signer: CLIENT_SIGNER.into(),
            username: username.into(),
            usages: vec!["digital signature".into(), "client auth".into()],
            pem: csr(&format!("system:node:{name}"), &["system:nodes"], vec![]),
            object: serde_json::Value::Null,
        }
    }

    fn serving(username: &str, name: &str, ips: &[&str], dns: &[&str]) -> Request {
        let mut sans: Vec<SanType> = ips
            .iter()
            .map(|ip| SanType::IpAddress(ip.parse().unwrap()))
            .collect();
        sans.extend(
            dns.iter()
                .map(|d| SanType::DnsName((*d).try_into().unwrap())),
        );
        Request {
            name: "csr-2".into(),
            signer: SERVING_SIGNER.into(),
            username: username.into(),
            usages: vec![
                "digital signature".into(),
                "key encipherment".into(),
                "server auth".into(),
            ],
            pem: csr(&format!("system:node:{name}"), &["system:nodes"], sans),
            object: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_decision_adds_its_condition_to_the_request_as_listed() {
        let listed = serde_json::json!({
            "metadata": {"name": "csr-1", "resourceVersion": "42"},
            "spec": {"signerName": CLIENT_SIGNER},
            "status": {},
        });
        let mut req = client("system:bootstrap:abcdef", NODE);
        req.object = listed.clone();
        let now = OffsetDateTime::parse("2026-12-03T10:00:00.5Z", &Rfc3339).unwrap();
        let body = decision(&req, "Approved", "a running node", now);
        assert_eq!(body["metadata"], listed["metadata"]);
        assert_eq!(body["spec"], listed["spec"]);
        assert_eq!(
            body["status"]["conditions"],
            serde_json::json!([{
                "type": "Approved",
                "status": "True",
                "reason": REASON,
                "message": "a running node",
                "lastUpdateTime": "2026-12-03T10:00:00Z",
            }])
        );
        // The conditions the object already holds are kept.
        req.object["status"]["conditions"] = serde_json::json!([{"type": "Failed"}]);
        let body = decision(&req, "Denied", "not a member", now);
        let kinds: Vec<&str> = body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["Failed", "Denied"]);
    }

    fn denied(v: &Verdict, reason: &str) -> bool {
        matches!(v, Verdict::Deny(why) if why.contains(reason))
    }

    #[test]
    fn a_bootstrapper_gets_a_client_certificate_only_for_a_member_node() {
        let m = members();
        let boot = "system:bootstrap:abcdef";
        assert!(matches!(
            judge(&client(boot, NODE), &m, MASTER),
            Verdict::Approve(_)
        ));
        let v = judge(&client(boot, MASTER), &m, MASTER);
        assert!(denied(&v, "the master's name"), "{v:?}");
        let v = judge(&client(boot, "i-0fffffffffffffff0"), &m, MASTER);
        assert!(denied(&v, "not a running instance"), "{v:?}");
        // Someone else's request for a node's identity.
        let v = judge(&client("kubernetes-admin", NODE), &m, MASTER);
        assert!(denied(&v, "neither a bootstrapper"), "{v:?}");
    }

    #[test]
    fn a_client_request_for_more_than_a_node_identity_is_denied() {
        let m = members();
        let boot = "system:bootstrap:abcdef";
        let mut admin = client(boot, NODE);
        admin.pem = csr(
            &format!("system:node:{NODE}"),
            &["system:nodes", "system:masters"],
            vec![],
        );
        assert!(denied(&judge(&admin, &m, MASTER), "groups"));
        let mut other = client(boot, NODE);
        other.pem = csr("kubernetes-admin", &["system:nodes"], vec![]);
        assert!(denied(&judge(&other, &m, MASTER), "not a system:node"));
        let mut serve = client(boot, NODE);
        serve.usages.push("server auth".into());
        assert!(denied(&judge(&serve, &m, MASTER), "usages"));
        let mut garbage = client(boot, NODE);
        garbage.pem =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
        assert!(denied(&judge(&garbage, &m, MASTER), "unreadable"));
    }

    #[test]
    fn a_serving_certificate_names_only_the_instances_own_addresses() {
        let m = members();
        let me = format!("system:node:{NODE}");
        let ok = serving(
            &me,
            NODE,
            &["10.0.1.23"],
            &[NODE, "ip-10-0-1-23.ec2.internal"],
        );
        assert!(matches!(judge(&ok, &m, MASTER), Verdict::Approve(_)));
        let v = judge(&serving(&me, NODE, &["10.0.1.10"], &[NODE]), &m, MASTER);
        assert!(denied(&v, "10.0.1.10 is not an address"), "{v:?}");
        let v = judge(
            &serving(&me, NODE, &["10.0.1.23"], &["kubernetes"]),
            &m,
            MASTER,
        );
        assert!(denied(&v, "kubernetes is not a name"), "{v:?}");
        let v = judge(&serving(&me, MASTER, &["10.0.1.10"], &[]), &m, MASTER);
        assert!(denied(&v, "asks for ip-10-0-1-10's serving"), "{v:?}");
        // The master's kubelet, for its stable IP.
        let master = format!("system:node:{MASTER}");
        let v = judge(
            &serving(&master, MASTER, &["10.0.1.10"], &[MASTER]),
            &m,
            MASTER,
        );
        assert!(matches!(v, Verdict::Approve(_)), "{v:?}");
    }

    #[test]
    fn a_kubelet_renews_its_own_client_certificate_while_it_runs() {
        let m = members();
        let me = format!("system:node:{NODE}");
        assert!(matches!(
            judge(&client(&me, NODE), &m, MASTER),
            Verdict::Approve(_)
        ));
        let master = format!("system:node:{MASTER}");
        assert!(matches!(
            judge(&client(&master, MASTER), &m, MASTER),
            Verdict::Approve(_)
        ));
        let gone = "i-0fffffffffffffff0";
        let v = judge(&client(&format!("system:node:{gone}"), gone), &m, MASTER);
        assert!(denied(&v, "no longer a running instance"), "{v:?}");
        // One node for another.
        let v = judge(&client(&me, MASTER), &m, MASTER);
        assert!(denied(&v, "neither a bootstrapper"), "{v:?}");
    }

    #[test]
    fn other_signers_are_left_to_others() {
        let mut other = client("system:bootstrap:abcdef", NODE);
        other.signer = "example.com/signer".into();
        assert_eq!(judge(&other, &members(), MASTER), Verdict::Leave);
    }

    #[test]
    fn only_undecided_requests_are_pending() {
        let pem = csr(&format!("system:node:{NODE}"), &["system:nodes"], vec![]);
        let b64 = crate::pki::b64(&pem);
        let json = format!(
            r#"{{"items": [
              {{"metadata": {{"name": "a"}}, "spec": {{"request": "{b64}", "signerName": "{CLIENT_SIGNER}", "username": "system:bootstrap:abcdef", "usages": ["client auth"]}}, "status": {{}}}},
              {{"metadata": {{"name": "b"}}, "spec": {{"request": "{b64}", "signerName": "{CLIENT_SIGNER}", "username": "u", "usages": []}}, "status": {{"conditions": [{{"type": "Approved"}}]}}}}
            ]}}"#
        );
        let p = pending(&json).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "a");
        assert_eq!(p[0].pem, pem);
        assert_eq!(p[0].usages, ["client auth"]);
        assert!(pending("not json").is_err());
    }
}
