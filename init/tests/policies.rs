//! The template's policies evaluated for every call the boot makes, with
//! the resource ARNs, tags and context keys the call carries on AWS, by the
//! tests' own evaluator (`vm_tests::policy`, a stand-in for AWS's: the local
//! AWS evaluates no conditions, no resource ARNs outside S3 and no bucket
//! policy). Each member is allowed exactly what it calls, on its own
//! resources; a node is refused the master's secrets, volume and address;
//! a reader with IAM read access to everything is refused the CA key
//! unless the stack names it.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

mod common;

use common::{template, BUCKET, REGION};
use serde_json::Value;
use slipway_init::config::Role;
use slipway_init::steps;
use std::collections::BTreeMap;
use vm_tests::iam::{resolve, stack_names, template_policies, ACCOUNT};
use vm_tests::policy::{evaluate, evaluate_key, Decision, Request};

const CLUSTER: &str = "demo";
use vm_tests::iam::API_ZONE;
const VOLUME: &str = "vol-0123456789abcdef0";
const ALLOCATION: &str = "eipalloc-0123456789abcdef0";
const MASTER_ROLE: &str = "slipway-MasterRole-ABC";
const NODE_ROLE: &str = "slipway-NodeRole-DEF";
const READER: &str = "arn:aws:iam::123456789012:role/ClusterAdmin";

fn arn(service: &str, resource: &str) -> String {
    format!("arn:aws:{service}:{REGION}:{ACCOUNT}:{resource}")
}

/// An etcd backup's key below the cluster's prefix.
const BACKUP: &str = "etcd-backups/20261202T091500Z-r4242.db";

fn object(key: &str) -> String {
    format!("arn:aws:s3:::{BUCKET}/{CLUSTER}/{key}")
}

/// The stack as deployed: every name its policies refer to.
fn names(readers: &[&str]) -> BTreeMap<String, String> {
    let mut n = stack_names("slipway", CLUSTER, BUCKET, REGION);
    for (k, v) in [
        ("MasterVolume", VOLUME.to_owned()),
        ("MasterAddress.AllocationId", ALLOCATION.to_owned()),
        (
            "MasterRole.Arn",
            format!("arn:aws:iam::{ACCOUNT}:role/{MASTER_ROLE}"),
        ),
        (
            "NodeRole.Arn",
            format!("arn:aws:iam::{ACCOUNT}:role/{NODE_ROLE}"),
        ),
        ("SecretsReaders", serde_json::to_string(readers).unwrap()),
        (
            "Condition:HasSecretsReaders",
            (!readers.is_empty()).to_string(),
        ),
    ] {
        n.insert(k.to_owned(), v);
    }
    n
}

/// The deployed stack's policies: each role's, and the bucket's.
struct Stack {
    master: Vec<Value>,
    node: Vec<Value>,
    bucket: Value,
    key: Value,
}

impl Stack {
    fn deploy(template: &Value, readers: &[&str]) -> Self {
        let names = names(readers);
        let role = |logical: &str| -> Vec<Value> {
            template_policies(template, logical)
                .unwrap()
                .into_iter()
                .map(|(_, doc)| resolve(&doc, &names).unwrap())
                .collect()
        };
        let bucket = resolve(
            &template["Resources"]["SecretsBucketPolicy"]["Properties"]["PolicyDocument"],
            &names,
        )
        .unwrap();
        let key = resolve(
            &template["Resources"]["SecretsKey"]["Properties"]["KeyPolicy"],
            &names,
        )
        .unwrap();
        Self {
            master: role("MasterRole"),
            node: role("NodeRole"),
            bucket,
            key,
        }
    }

    /// The identity policies of `member`'s role.
    fn policies(&self, member: Role) -> &[Value] {
        match member {
            Role::Master => &self.master,
            Role::Node => &self.node,
        }
    }

    /// The decision for `request` made by an instance of `member`.
    fn decide(&self, member: Role, request: &Request) -> Decision {
        self.decide_for(self.policies(member), request)
    }

    /// The decision for `request`; for an object's read or write, S3's
    /// own and then the one KMS makes on the object's key for the caller.
    fn decide_for(&self, policies: &[Value], request: &Request) -> Decision {
        let bucket = request.action.starts_with("s3:").then_some(&self.bucket);
        let decision = evaluate(policies, bucket, request).unwrap();
        match kms_request(request) {
            Some(kms) if decision == Decision::Allow => {
                evaluate_key(policies, &self.key, &kms).unwrap()
            }
            _ => decision,
        }
    }
}

/// What S3 asks KMS on the caller's behalf to read or write an object of
/// the bucket (SSE-KMS, no bucket key: the object's ARN is the context).
fn kms_request(s3: &Request) -> Option<Request> {
    let action = match s3.action.as_str() {
        "s3:GetObject" => "kms:Decrypt",
        "s3:PutObject" => "kms:GenerateDataKey",
        _ => return None,
    };
    let mut kms = Request::new(
        &s3.principal,
        action,
        &arn("kms", "key/11111111-2222-3333-4444-555555555555"),
    );
    kms.context = s3.context.clone();
    Some(
        kms.with("kms:ViaService", &format!("s3.{REGION}.amazonaws.com"))
            .with("kms:EncryptionContext:aws:s3:arn", &s3.resource),
    )
}

/// An instance of the cluster as AWS describes it to IAM.
struct Member {
    role: &'static str,
    instance: &'static str,
    eni: &'static str,
    group: &'static str,
}

const MASTER: Member = Member {
    role: MASTER_ROLE,
    instance: "i-0aaaaaaaaaaaaaaa1",
    eni: "eni-0aaaaaaaaaaaaaaa1",
    group: "slipway-master",
};
const NODE: Member = Member {
    role: NODE_ROLE,
    instance: "i-0bbbbbbbbbbbbbbb2",
    eni: "eni-0bbbbbbbbbbbbbbb2",
    group: "slipway-node",
};

impl Member {
    /// A request by this member's instance credentials on one resource,
    /// with that resource's `slipway:cluster` tag when it has one.
    fn request(&self, action: &str, resource: &str, cluster_tag: Option<&str>) -> Request {
        let mut r = Request::new(
            &format!(
                "arn:aws:sts::{ACCOUNT}:assumed-role/{}/{}",
                self.role, self.instance
            ),
            action,
            resource,
        )
        .with(
            "aws:PrincipalArn",
            &format!("arn:aws:iam::{ACCOUNT}:role/{}", self.role),
        )
        .with("aws:SecureTransport", "true")
        .with(
            "ec2:SourceInstanceARN",
            &arn("ec2", &format!("instance/{}", self.instance)),
        )
        // EC2's undocumented key for the resource's own ARN, which the
        // template's own-instance statements compare with the caller's.
        .with("aws:ARN", resource);
        if let Some(tag) = cluster_tag {
            r = r.with("aws:ResourceTag/slipway:cluster", tag);
        }
        r
    }

    fn instance_arn(&self) -> String {
        arn("ec2", &format!("instance/{}", self.instance))
    }
}

/// Every request `member` makes for `action` during a boot (an EC2 call
/// is authorized once per resource it touches). `None` for an action this
/// table does not describe, which fails the test: a new call must say
/// what it touches.
fn boot_requests(member: &Member, role: Role, action: &str) -> Option<Vec<Request>> {
    let me = member.instance_arn();
    let ours = Some(CLUSTER);
    let predecessor = arn("ec2", "instance/i-0ccccccccccccccc3");
    let r = |resource: &str, tag| member.request(action, resource, tag);
    Some(match action {
        "ec2:DescribeInstances"
        | "ec2:DescribeInstanceAttribute"
        | "ec2:DescribeVolumes"
        | "ec2:DescribeSnapshots"
        | "ec2:DescribeAddresses" => vec![r("*", None)],
        "ec2:AttachVolume" => vec![data_volume(r(&volume_arn(VOLUME), ours)), r(&me, ours)],
        "ec2:DetachVolume" => vec![
            data_volume(r(&volume_arn(VOLUME), ours)),
            r(&predecessor, ours),
        ],
        // A restore: the new volume from the cluster's snapshot, tagged
        // at creation as a restore in progress...
        "ec2:CreateVolume" => vec![
            data_volume(r(&snapshot_arn(), None)),
            creation(r(&volume_arn("*"), None)),
        ],
        // A fresh snapshot of the old volume, when its zone answers.
        "ec2:CreateSnapshot" => vec![
            data_volume(r(&volume_arn(VOLUME), ours)),
            fresh_snapshot(r(&new_snapshot_arn(), None)),
        ],
        // ...then the cluster's tag moved to it from the old volume.
        "ec2:CreateTags" => vec![
            creation(r(&volume_arn(RESTORED), None)).with("ec2:CreateAction", "CreateVolume"),
            fresh_snapshot(r(&new_snapshot_arn(), None)).with("ec2:CreateAction", "CreateSnapshot"),
            data_volume(r(&volume_arn(VOLUME), ours))
                .with_set("aws:TagKeys", &["slipway:superseded"]),
            r(&volume_arn(RESTORED), ours).with_set("aws:TagKeys", &["slipway:etcd-data"]),
        ],
        "ec2:DeleteTags" => vec![
            data_volume(r(&volume_arn(VOLUME), ours))
                .with_set("aws:TagKeys", &["slipway:etcd-data"]),
            r(&volume_arn(RESTORED), ours).with_set("aws:TagKeys", &["slipway:restoring"]),
        ],
        "ec2:AssociateAddress" => vec![
            r(&arn("ec2", &format!("elastic-ip/{ALLOCATION}")), ours),
            r(&me, ours),
            r(
                &arn("ec2", &format!("network-interface/{}", member.eni)),
                ours,
            ),
        ],
        "ec2:AssignPrivateIpAddresses" => {
            vec![r(
                &arn("ec2", &format!("network-interface/{}", member.eni)),
                ours,
            )]
        }
        "ec2:ModifyInstanceAttribute" => vec![r(&me, ours)],
        "ssm:PutParameter" => vec![r(&record(CLUSTER), None)],
        "s3:GetObject" | "s3:PutObject" => {
            let keys: &[&str] = match (role, action) {
                (Role::Node, _) => &["node.json"],
                (Role::Master, "s3:GetObject") => &["pki.json", BACKUP],
                (Role::Master, _) => &["pki.json", "node.json", "admin.conf", BACKUP],
            };
            keys.iter().map(|k| r(&object(k), None)).collect()
        }
        // Retention: only backups.
        "s3:DeleteObject" => vec![r(&object(BACKUP), None)],
        "s3:ListBucket" => vec![r(&format!("arn:aws:s3:::{BUCKET}"), None)
            .with("s3:prefix", &format!("{CLUSTER}/etcd-backups/"))],
        "route53:ChangeResourceRecordSets" => {
            vec![api_record(r(&zone_arn(API_ZONE), None), &api_name(), "A")]
        }
        "cloudformation:DescribeStacks" => vec![r(
            &arn(
                "cloudformation",
                "stack/slipway/00000000-0000-0000-0000-000000000000",
            ),
            None,
        )],
        "cloudformation:SignalResource" => vec![r(
            &arn(
                "cloudformation",
                "stack/slipway/00000000-0000-0000-0000-000000000000",
            ),
            None,
        )],
        "autoscaling:SetInstanceHealth" => vec![r(
            &arn(
                "autoscaling",
                &format!(
                    "autoScalingGroup:11111111-2222-3333-4444-555555555555:autoScalingGroupName/{}",
                    member.group
                ),
            ),
            None,
        )],
        _ => return None,
    })
}

/// A hosted zone's ARN (Route 53's are global: no region, no account).
fn zone_arn(id: &str) -> String {
    format!("arn:aws:route53:::hostedzone/{id}")
}

/// The API's name inside the VPC, as the template writes it.
fn api_name() -> String {
    format!("api.{CLUSTER}.slipway.internal")
}

/// A change of one record, `name` of type `kind`, as Route 53 describes
/// it to IAM.
fn api_record(request: Request, name: &str, kind: &str) -> Request {
    request
        .with_set(
            "route53:ChangeResourceRecordSetsNormalizedRecordNames",
            &[name],
        )
        .with_set("route53:ChangeResourceRecordSetsRecordTypes", &[kind])
}

/// The SSM parameter that records `cluster`'s restores.
fn record(cluster: &str) -> String {
    arn(
        "ssm",
        &format!("parameter{}", steps::restore::record_name(cluster)),
    )
}

/// The volume a restore creates.
const RESTORED: &str = "vol-0fedcba9876543210";

fn volume_arn(id: &str) -> String {
    arn("ec2", &format!("volume/{id}"))
}

/// A Data Lifecycle Manager snapshot of the cluster's volume (snapshots
/// have no account in their ARN).
fn snapshot_arn() -> String {
    format!("arn:aws:ec2:{REGION}::snapshot/snap-0123456789abcdef0")
}

/// The snapshot a restore takes (its ID unknown until it exists).
fn new_snapshot_arn() -> String {
    format!("arn:aws:ec2:{REGION}::snapshot/*")
}

/// `request` creating a snapshot with the tags a restore gives it.
fn fresh_snapshot(request: Request) -> Request {
    let mut r = request;
    for key in ["slipway:cluster", "slipway:etcd-data"] {
        r = r.with(&format!("aws:RequestTag/{key}"), CLUSTER);
    }
    r.with("aws:RequestTag/Name", "demo-etcd-fresh")
        .with("aws:RequestTag/slipway:fresh-for", MASTER.instance)
        .with_set(
            "aws:TagKeys",
            &[
                "Name",
                "slipway:cluster",
                "slipway:etcd-data",
                "slipway:fresh-for",
            ],
        )
}

/// `request` on the cluster's current data volume, or on a snapshot of
/// it, which carries the volume's tags.
fn data_volume(request: Request) -> Request {
    request.with("aws:ResourceTag/slipway:etcd-data", CLUSTER)
}

/// `request` creating a volume with the tags a restore gives it.
fn creation(request: Request) -> Request {
    let mut r = request;
    for key in ["slipway:cluster", "slipway:restoring"] {
        r = r.with(&format!("aws:RequestTag/{key}"), CLUSTER);
    }
    r.with("aws:RequestTag/Name", "demo-etcd-restored")
        .with(
            "aws:RequestTag/slipway:restored-from",
            "snap-0123456789abcdef0",
        )
        .with_set(
            "aws:TagKeys",
            &[
                "Name",
                "slipway:cluster",
                "slipway:restoring",
                "slipway:restored-from",
            ],
        )
}

fn member(role: Role) -> &'static Member {
    match role {
        Role::Master => &MASTER,
        Role::Node => &NODE,
    }
}

#[test]
fn every_call_of_the_boot_is_allowed_on_its_own_resources_own_evaluator() {
    let stack = Stack::deploy(&template(), &[]);
    for role in [Role::Master, Role::Node] {
        for action in steps::calls(role) {
            let requests = boot_requests(member(role), role, action)
                .unwrap_or_else(|| panic!("{action}: say which resources it touches"));
            for req in requests {
                assert_eq!(
                    stack.decide(role, &req),
                    Decision::Allow,
                    "{role:?} {action} on {}",
                    req.resource
                );
            }
        }
    }
}

#[test]
fn each_member_is_refused_what_only_the_other_calls_and_what_nobody_calls_own_evaluator() {
    let stack = Stack::deploy(&template(), &[]);
    let uncalled = [
        "ec2:TerminateInstances",
        "ec2:DeleteVolume",
        "ec2:DeleteSnapshot",
        "ec2:ReleaseAddress",
        "iam:PassRole",
        "kms:Decrypt",
    ];
    for (role, other) in [(Role::Master, Role::Node), (Role::Node, Role::Master)] {
        let own = steps::calls(role);
        let foreign = steps::calls(other)
            .into_iter()
            .filter(|a| !own.contains(a))
            .chain(uncalled);
        for action in foreign {
            let requests = boot_requests(member(other), other, action)
                .unwrap_or_else(|| vec![member(role).request(action, "*", Some(CLUSTER))]);
            for mut req in requests {
                // The same request, made with this member's credentials.
                let mine = member(role).request(action, &req.resource, None);
                req.principal = mine.principal;
                req.context.extend(mine.context);
                assert_ne!(
                    stack.decide(role, &req),
                    Decision::Allow,
                    "{role:?} may {action} on {}",
                    req.resource
                );
            }
        }
    }
}

#[test]
fn the_master_may_point_the_apis_name_and_nothing_else_in_dns_own_evaluator() {
    let stack = Stack::deploy(&template(), &[]);
    let change = |zone: &str, name: &str, kind: &str| {
        let req = MASTER.request("route53:ChangeResourceRecordSets", &zone_arn(zone), None);
        api_record(req, name, kind)
    };
    assert_eq!(
        stack.decide(Role::Master, &change(API_ZONE, &api_name(), "A")),
        Decision::Allow
    );
    for (what, req) in [
        (
            "another name",
            change(API_ZONE, "www.demo.slipway.internal", "A"),
        ),
        ("another type", change(API_ZONE, &api_name(), "TXT")),
        ("another zone", change("Z9999999999OTHER", &api_name(), "A")),
        (
            "the name and another",
            MASTER
                .request(
                    "route53:ChangeResourceRecordSets",
                    &zone_arn(API_ZONE),
                    None,
                )
                .with_set(
                    "route53:ChangeResourceRecordSetsNormalizedRecordNames",
                    &[api_name().as_str(), "mail.demo.slipway.internal"],
                )
                .with_set("route53:ChangeResourceRecordSetsRecordTypes", &["A"]),
        ),
    ] {
        assert_ne!(stack.decide(Role::Master, &req), Decision::Allow, "{what}");
    }
    let node = NODE.request(
        "route53:ChangeResourceRecordSets",
        &zone_arn(API_ZONE),
        None,
    );
    assert_ne!(
        stack.decide(Role::Node, &api_record(node, &api_name(), "A")),
        Decision::Allow
    );
}

#[test]
fn a_node_is_refused_the_masters_secrets_volume_and_address_own_evaluator() {
    let stack = Stack::deploy(&template(), &[]);
    let volume = arn("ec2", &format!("volume/{VOLUME}"));
    let address = arn("ec2", &format!("elastic-ip/{ALLOCATION}"));
    let refused = [
        NODE.request("s3:GetObject", &object("pki.json"), None),
        NODE.request("s3:GetObject", &object("admin.conf"), None),
        NODE.request("s3:PutObject", &object("node.json"), None),
        NODE.request("ec2:AttachVolume", &volume, Some(CLUSTER)),
        NODE.request("ec2:DetachVolume", &volume, Some(CLUSTER)),
        NODE.request("ec2:AssociateAddress", &address, Some(CLUSTER)),
        // Another member's source/destination check, or its health.
        NODE.request(
            "ec2:ModifyInstanceAttribute",
            &MASTER.instance_arn(),
            Some(CLUSTER),
        ),
        MASTER.request(
            "ec2:ModifyInstanceAttribute",
            &NODE.instance_arn(),
            Some(CLUSTER),
        ),
        // Deleting anything but a backup (the PKI, the node bundle).
        MASTER.request("s3:DeleteObject", &object("pki.json"), None),
        MASTER.request("s3:DeleteObject", &object("node.json"), None),
        NODE.request("s3:DeleteObject", &object(BACKUP), None),
        // Another cluster's volume and secrets.
        MASTER.request("ec2:AttachVolume", &volume, Some("another")),
        // A volume of the cluster that is not its etcd data (a superseded
        // one), and a volume from another cluster's snapshot.
        MASTER.request("ec2:AttachVolume", &volume, Some(CLUSTER)),
        MASTER
            .request("ec2:CreateVolume", &snapshot_arn(), None)
            .with("aws:ResourceTag/slipway:etcd-data", "another"),
        // A volume created without the restore's tags, or another cluster's.
        MASTER.request("ec2:CreateVolume", &volume_arn("*"), None),
        creation(MASTER.request("ec2:CreateVolume", &volume_arn("*"), None))
            .with("aws:RequestTag/slipway:cluster", "another"),
        // A snapshot of another cluster's volume, or one not tagged as
        // this cluster's; a node's.
        MASTER
            .request("ec2:CreateSnapshot", &volume, Some("another"))
            .with("aws:ResourceTag/slipway:etcd-data", "another"),
        MASTER.request("ec2:CreateSnapshot", &new_snapshot_arn(), None),
        fresh_snapshot(MASTER.request("ec2:CreateSnapshot", &new_snapshot_arn(), None))
            .with("aws:RequestTag/slipway:etcd-data", "another"),
        NODE.request("ec2:CreateSnapshot", &volume, Some(CLUSTER))
            .with("aws:ResourceTag/slipway:etcd-data", CLUSTER),
        // Tags on another cluster's volume, or keys beyond the restore's.
        MASTER
            .request("ec2:CreateTags", &volume, Some("another"))
            .with_set("aws:TagKeys", &["slipway:etcd-data"]),
        MASTER
            .request("ec2:CreateTags", &volume, Some(CLUSTER))
            .with_set("aws:TagKeys", &["slipway:etcd-data", "slipway:cluster"]),
        MASTER
            .request("ec2:DeleteTags", &volume, Some(CLUSTER))
            .with_set("aws:TagKeys", &["slipway:cluster"]),
        NODE.request("ec2:CreateTags", &volume, Some(CLUSTER))
            .with_set("aws:TagKeys", &["slipway:etcd-data"]),
        MASTER.request(
            "s3:GetObject",
            &format!("arn:aws:s3:::{BUCKET}/another/pki.json"),
            None,
        ),
        // Another cluster's restore record; a node writing any.
        MASTER.request("ssm:PutParameter", &record("another"), None),
        NODE.request("ssm:PutParameter", &record(CLUSTER), None),
    ];
    for req in refused {
        let role = if req.principal.contains(NODE_ROLE) {
            Role::Node
        } else {
            Role::Master
        };
        assert_ne!(
            stack.decide(role, &req),
            Decision::Allow,
            "{} may {} on {}",
            req.principal,
            req.action,
            req.resource
        );
    }
}

#[test]
fn only_named_readers_read_the_ca_key_whatever_their_iam_allows_own_evaluator() {
    let read_only = serde_json::json!({"Statement": [{"Effect": "Allow",
        "Action": ["s3:Get*", "s3:List*", "ec2:Describe*", "kms:Decrypt"], "Resource": "*"}]});
    let as_user = |principal: &str| {
        Request::new(principal, "s3:GetObject", &object("pki.json"))
            .with("aws:PrincipalArn", principal)
            .with("aws:SecureTransport", "true")
    };
    let user = format!("arn:aws:iam::{ACCOUNT}:user/auditor");
    // Nobody named: the read-only user is refused by the bucket's policy.
    let stack = Stack::deploy(&template(), &[]);
    assert!(matches!(
        stack.decide_for(std::slice::from_ref(&read_only), &as_user(&user)),
        Decision::ExplicitDeny(_)
    ));
    assert!(matches!(
        stack.decide_for(std::slice::from_ref(&read_only), &as_user(READER)),
        Decision::ExplicitDeny(_)
    ));
    // The reader named in SecretsReaders reads; the user still does not.
    let stack = Stack::deploy(&template(), &[READER]);
    assert_eq!(
        stack.decide_for(std::slice::from_ref(&read_only), &as_user(READER)),
        Decision::Allow
    );
    assert!(matches!(
        stack.decide_for(std::slice::from_ref(&read_only), &as_user(&user)),
        Decision::ExplicitDeny(_)
    ));
    // Without TLS, not even a member.
    let plain = MASTER
        .request("s3:GetObject", &object("pki.json"), None)
        .with("aws:SecureTransport", "false");
    assert!(matches!(
        stack.decide(Role::Master, &plain),
        Decision::ExplicitDeny(_)
    ));
}

#[test]
fn the_secrets_key_decrypts_only_what_each_member_may_read_own_evaluator() {
    let stack = Stack::deploy(&template(), &[]);
    let kms = |member: &Member, action: &str, key: &str| {
        kms_request(&member.request(action, &object(key), None)).unwrap()
    };
    let cases = [
        (Role::Master, kms(&MASTER, "s3:GetObject", "pki.json"), true),
        (
            Role::Master,
            kms(&MASTER, "s3:PutObject", "admin.conf"),
            true,
        ),
        (Role::Node, kms(&NODE, "s3:GetObject", "node.json"), true),
        (Role::Node, kms(&NODE, "s3:GetObject", "pki.json"), false),
        (Role::Node, kms(&NODE, "s3:GetObject", "admin.conf"), false),
        (Role::Node, kms(&NODE, "s3:PutObject", "node.json"), false),
    ];
    for (role, req, allowed) in cases {
        // The key's policy alone: these roles' IAM policies grant no KMS use.
        let decision = evaluate_key(stack.policies(role), &stack.key, &req).unwrap();
        assert_eq!(
            decision == Decision::Allow,
            allowed,
            "{role:?} {} for {}: {decision:?}",
            req.action,
            req.context["kms:EncryptionContext:aws:s3:arn"]
        );
    }
    // Another cluster's objects under the same key: no.
    let other = kms_request(&MASTER.request(
        "s3:GetObject",
        &format!("arn:aws:s3:::{BUCKET}/another/pki.json"),
        None,
    ))
    .unwrap();
    assert_ne!(
        evaluate_key(&stack.master, &stack.key, &other).unwrap(),
        Decision::Allow
    );
    // Not through S3 (a direct Decrypt of a stolen ciphertext): no.
    let mut direct = kms(&MASTER, "s3:GetObject", "pki.json");
    direct.context.remove("kms:ViaService");
    assert_ne!(
        evaluate_key(&stack.master, &stack.key, &direct).unwrap(),
        Decision::Allow
    );
}
