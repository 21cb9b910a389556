//! Security rules every rendered template must pass, checked over the
//! parsed template (no external engine): `image-builder publish` refuses to
//! write a template that breaks one, and the tests prove each rule fires.
//!
//! - `open-ingress`: no ingress from 0.0.0.0/0 or ::/0, unless the CIDR is
//!   a parameter (the operator's choice) whose default is not the world
//!   and which a template rule refuses to set to 0.0.0.0/0 unless the
//!   operator says so explicitly;
//! - `imdsv2`: every launch template requires IMDSv2 session tokens with a
//!   response hop limit of 1 (no container reaches the instance's role);
//! - `bucket-public`: every bucket blocks public access on all four
//!   switches, has default encryption, and no bucket policy allows `*`
//!   (as a string or in a list);
//! - `volume-unencrypted`: every EBS volume is encrypted, and every launch
//!   template encrypts the root volume itself (not the account's default);
//! - `iam-wildcard`: no policy allows every action, or a service's every
//!   action on every resource;
//! - `rolling-update`: every Auto Scaling group waits for its instances'
//!   signals when created and rolls through a release update waiting for
//!   them; the master's group (the one whose launch template tags
//!   `slipway:role` master) can never run two masters (at most one
//!   instance, none kept in service, one at a time, no replacing update);
//!   every other group updates after it; every instance is tagged with its
//!   release;
//! - `volume-backups`: every EBS volume the template makes (the master's
//!   etcd data) carries a tag an enabled Data Lifecycle Manager policy
//!   targets, with a schedule that creates snapshots and retains some.

use serde_json::Value;

use super::ami::ROOT_DEVICE;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: &'static str,
    pub resource: String,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.resource, self.rule, self.detail)
    }
}

const WORLD: [&str; 2] = ["0.0.0.0/0", "::/0"];

fn as_list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => vec![],
        other => vec![other],
    }
}

/// Runs every rule; an empty result means the template passes.
pub fn check(template: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    let empty = serde_json::Map::new();
    let resources = template["Resources"].as_object().unwrap_or(&empty);
    for (name, r) in resources {
        let props = &r["Properties"];
        let mut flag = |rule, detail: String| {
            out.push(Violation {
                rule,
                resource: name.clone(),
                detail,
            })
        };
        match r["Type"].as_str().unwrap_or("") {
            "AWS::EC2::SecurityGroupIngress" => {
                if let Some(d) = open_ingress(props, template) {
                    flag("open-ingress", d);
                }
            }
            "AWS::EC2::SecurityGroup" => {
                for rule in as_list(&props["SecurityGroupIngress"]) {
                    if let Some(d) = open_ingress(rule, template) {
                        flag("open-ingress", d);
                    }
                }
            }
            "AWS::EC2::LaunchTemplate" => {
                let data = &props["LaunchTemplateData"];
                if data["MetadataOptions"]["HttpTokens"] != "required" {
                    flag(
                        "imdsv2",
                        "MetadataOptions.HttpTokens is not \"required\"".into(),
                    );
                }
                match data["MetadataOptions"]["HttpPutResponseHopLimit"].as_u64() {
                    Some(1) => {}
                    other => flag(
                        "imdsv2",
                        format!("MetadataOptions.HttpPutResponseHopLimit is {other:?}, not 1"),
                    ),
                }
                let disks = as_list(&data["BlockDeviceMappings"]);
                for bdm in &disks {
                    if bdm["Ebs"].is_object() && bdm["Ebs"]["Encrypted"] != true {
                        flag(
                            "volume-unencrypted",
                            "a launch-template disk is not encrypted".into(),
                        );
                    }
                }
                if !disks.iter().any(|d| d["DeviceName"] == ROOT_DEVICE) {
                    flag(
                        "volume-unencrypted",
                        format!(
                            "no block device mapping for the root ({ROOT_DEVICE}) says Encrypted"
                        ),
                    );
                }
            }
            "AWS::EC2::Instance" => {
                flag(
                    "imdsv2",
                    "a bare instance cannot require IMDSv2; use a launch template".into(),
                );
            }
            "AWS::EC2::Volume" if props["Encrypted"] != true => {
                flag("volume-unencrypted", "Encrypted is not true".into());
            }
            "AWS::S3::Bucket" => {
                let pab = &props["PublicAccessBlockConfiguration"];
                for switch in [
                    "BlockPublicAcls",
                    "BlockPublicPolicy",
                    "IgnorePublicAcls",
                    "RestrictPublicBuckets",
                ] {
                    if pab[switch] != true {
                        flag("bucket-public", format!("{switch} is not true"));
                    }
                }
                if props["BucketEncryption"].is_null() {
                    flag("bucket-public", "no default encryption".into());
                }
                if let Some(acl) = props["AccessControl"].as_str() {
                    if acl.starts_with("Public") {
                        flag("bucket-public", format!("AccessControl is {acl}"));
                    }
                }
            }
            "AWS::S3::BucketPolicy" => {
                for st in as_list(&props["PolicyDocument"]["Statement"]) {
                    let everyone = st["Principal"] == "*"
                        || as_list(&st["Principal"]["AWS"]).iter().any(|p| *p == "*");
                    if st["Effect"] == "Allow" && everyone {
                        flag(
                            "bucket-public",
                            "a bucket policy allows Principal \"*\"".into(),
                        );
                    }
                }
            }
            "AWS::IAM::Role" | "AWS::IAM::Policy" | "AWS::IAM::ManagedPolicy" => {
                let mut docs: Vec<&Value> = as_list(&props["Policies"])
                    .into_iter()
                    .map(|p| &p["PolicyDocument"])
                    .collect();
                docs.push(&props["PolicyDocument"]);
                for doc in docs {
                    for st in as_list(&doc["Statement"]) {
                        if let Some(d) = iam_wildcard(st) {
                            flag("iam-wildcard", d);
                        }
                    }
                }
            }
            "AWS::AutoScaling::AutoScalingGroup" => {
                for detail in rolling_update(name, r, template) {
                    flag("rolling-update", detail);
                }
            }
            _ => {}
        }
    }
    for (name, detail) in unbacked_volumes(resources) {
        out.push(Violation {
            rule: "volume-backups",
            resource: name,
            detail,
        });
    }
    out
}

/// Whether `policy` (an `AWS::DLM::LifecyclePolicy`) snapshots volumes on
/// a schedule and keeps what it takes.
fn snapshots_volumes(policy: &Value) -> bool {
    let props = &policy["Properties"];
    let details = &props["PolicyDetails"];
    let schedules = as_list(&details["Schedules"]);
    props["State"] == "ENABLED"
        && details["PolicyType"] == "EBS_SNAPSHOT_MANAGEMENT"
        && as_list(&details["ResourceTypes"])
            .iter()
            .any(|t| *t == "VOLUME")
        && !schedules.is_empty()
        && schedules
            .iter()
            .all(|s| s["CreateRule"].is_object() && s["RetainRule"].is_object())
}

/// Each volume no snapshot policy targets, and why.
fn unbacked_volumes(resources: &serde_json::Map<String, Value>) -> Vec<(String, String)> {
    let targeted: Vec<&Value> = resources
        .values()
        .filter(|r| r["Type"] == "AWS::DLM::LifecyclePolicy" && snapshots_volumes(r))
        .flat_map(|r| as_list(&r["Properties"]["PolicyDetails"]["TargetTags"]))
        .collect();
    resources
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::EC2::Volume")
        .filter(|(_, r)| {
            !as_list(&r["Properties"]["Tags"]).iter().any(|tag| {
                targeted
                    .iter()
                    .any(|t| t["Key"] == tag["Key"] && t["Value"] == tag["Value"])
            })
        })
        .map(|(name, _)| {
            (
                name.clone(),
                "no enabled Data Lifecycle Manager policy snapshots it (on a schedule, \
                 with a retention) by one of its tags"
                    .to_owned(),
            )
        })
        .collect()
}

/// The value of `tag` in the instance tags a launch template gives.
fn instance_tag<'a>(launch_template: &'a Value, tag: &str) -> Option<&'a Value> {
    as_list(&launch_template["Properties"]["LaunchTemplateData"]["TagSpecifications"])
        .into_iter()
        .filter(|spec| spec["ResourceType"] == "instance")
        .flat_map(|spec| as_list(&spec["Tags"]))
        .find(|t| t["Key"] == tag)
        .map(|t| &t["Value"])
}

/// The launch template an Auto Scaling group launches from (by `Ref`).
fn launch_template_of<'a>(group: &Value, template: &'a Value) -> Option<(&'a str, &'a Value)> {
    let name = group["Properties"]["LaunchTemplate"]["LaunchTemplateId"]["Ref"].as_str()?;
    let (name, lt) = template["Resources"].as_object()?.get_key_value(name)?;
    Some((name.as_str(), lt))
}

/// Whether a number in the template (a literal, or a string of one) is `n`.
fn is_number(v: &Value, n: u64) -> bool {
    v.as_u64() == Some(n) || v.as_str().and_then(|s| s.parse::<u64>().ok()) == Some(n)
}

fn is_master_group(group: &Value, template: &Value) -> bool {
    launch_template_of(group, template)
        .and_then(|(_, lt)| instance_tag(lt, "slipway:role"))
        .is_some_and(|role| role == "master")
}

fn rolling_update(name: &str, group: &Value, template: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if group["CreationPolicy"]["ResourceSignal"].is_null() {
        out.push("no CreationPolicy waits for its instances' signals".into());
    }
    let rolling = &group["UpdatePolicy"]["AutoScalingRollingUpdate"];
    if rolling.is_null() {
        out.push(
            "no UpdatePolicy.AutoScalingRollingUpdate: a release update would leave its instances on the old image"
                .into(),
        );
    } else if rolling["WaitOnResourceSignals"] != true {
        out.push("the rolling update does not wait for the new instances' signals".into());
    } else if rolling["PauseTime"].is_null() {
        out.push("the rolling update has no PauseTime (how long to wait for a signal)".into());
    }
    match launch_template_of(group, template) {
        Some((lt, data)) if instance_tag(data, "slipway:release").is_none() => out.push(format!(
            "{lt} does not tag its instances with slipway:release"
        )),
        Some(_) => {}
        None => out.push("launches from no launch template of this stack".into()),
    }
    if is_master_group(group, template) {
        let props = &group["Properties"];
        if !is_number(&props["MaxSize"], 1) {
            out.push(format!(
                "the master group's MaxSize is {}, not 1: two masters could run",
                props["MaxSize"]
            ));
        }
        let in_service = &rolling["MinInstancesInService"];
        if !(in_service.is_null() || is_number(in_service, 0)) {
            out.push(format!(
                "the master's rolling update keeps {in_service} in service: a second master would start beside the first"
            ));
        }
        let batch = &rolling["MaxBatchSize"];
        if !(batch.is_null() || is_number(batch, 1)) {
            out.push(format!(
                "the master's rolling update replaces {batch} at a time, not 1"
            ));
        }
        if group["UpdatePolicy"]["AutoScalingReplacingUpdate"]["WillReplace"] == true {
            out.push(
                "a replacing update starts a whole new master group beside the old one".into(),
            );
        }
    } else {
        let after_master = template["Resources"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, r)| {
                r["Type"] == "AWS::AutoScaling::AutoScalingGroup" && is_master_group(r, template)
            })
            .all(|(master, _)| {
                as_list(&group["DependsOn"])
                    .iter()
                    .any(|d| *d == master.as_str())
            });
        if !after_master {
            out.push(format!(
                "{name} does not depend on the master's group: its kubelets could be updated before their API server"
            ));
        }
    }
    out
}

fn open_ingress(rule: &Value, template: &Value) -> Option<String> {
    for key in ["CidrIp", "CidrIpv6"] {
        let cidr = &rule[key];
        if let Some(s) = cidr.as_str() {
            if WORLD.contains(&s) {
                return Some(format!("{key} {s} admits the whole internet"));
            }
        }
        if let Some(p) = cidr["Ref"].as_str() {
            if let Some(default) = template["Parameters"][p]["Default"].as_str() {
                if WORLD.contains(&default) {
                    return Some(format!("parameter {p} defaults to {default}"));
                }
            }
            if key == "CidrIp" && !guarded(p, template) {
                return Some(format!(
                    "no template rule refuses parameter {p} set to {}",
                    WORLD[0]
                ));
            }
        }
    }
    None
}

/// Whether one of the template's `Rules` asserts something about
/// parameter `param` and the world's CIDR (CloudFormation refuses a stack
/// whose parameters break an assertion).
fn guarded(param: &str, template: &Value) -> bool {
    let reference = serde_json::json!({ "Ref": param }).to_string();
    let Some(rules) = template["Rules"].as_object() else {
        return false;
    };
    rules.values().any(|rule| {
        as_list(&rule["Assertions"]).iter().any(|a| {
            let text = a["Assert"].to_string();
            text.contains(&reference) && text.contains(WORLD[0])
        })
    })
}

fn iam_wildcard(st: &Value) -> Option<String> {
    if st["Effect"] != "Allow" {
        return None;
    }
    let actions: Vec<&str> = as_list(&st["Action"])
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let any_resource = as_list(&st["Resource"]).iter().any(|r| *r == "*");
    if actions.contains(&"*") {
        return Some("allows every action".into());
    }
    if !st["NotAction"].is_null() {
        return Some("uses NotAction".into());
    }
    let service_wide = actions.iter().find(|a| a.ends_with(":*"));
    match service_wide {
        Some(a) if any_resource => Some(format!("allows {a} on every resource")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../cfn/template.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        serde_yaml_ng::from_str(&text).unwrap()
    }

    fn rules_fired(t: &Value) -> Vec<&'static str> {
        let mut r: Vec<&'static str> = check(t).iter().map(|v| v.rule).collect();
        r.dedup();
        r
    }

    #[test]
    fn the_shipped_template_passes() {
        assert_eq!(check(&template()), vec![]);
    }

    /// Removes the tag `key` from a list of tags.
    fn drop_tag(tags: &mut Value, key: &str) {
        if let Some(list) = tags.as_array_mut() {
            list.retain(|t| t["Key"] != key);
        }
    }

    #[test]
    fn each_rule_catches_its_violation() {
        type Mutation = fn(&mut Value);
        let cases: Vec<(&str, Mutation)> = vec![
            ("open-ingress", |t| {
                t["Resources"]["ApiFromAdmins"]["Properties"]["CidrIp"] = "0.0.0.0/0".into()
            }),
            ("open-ingress", |t| {
                t["Parameters"]["AdminCidr"]["Default"] = "0.0.0.0/0".into()
            }),
            ("open-ingress", |t| {
                t["Resources"]["NodeSecurityGroup"]["Properties"]["SecurityGroupIngress"] = serde_json::json!([{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIpv6": "::/0"}])
            }),
            ("imdsv2", |t| {
                t["Resources"]["NodeLaunchTemplate"]["Properties"]["LaunchTemplateData"]
                    ["MetadataOptions"]["HttpTokens"] = "optional".into()
            }),
            ("imdsv2", |t| {
                t["Resources"]["MasterLaunchTemplate"]["Properties"]["LaunchTemplateData"]
                    ["MetadataOptions"]["HttpPutResponseHopLimit"] = 2.into()
            }),
            ("open-ingress", |t| {
                t.as_object_mut().unwrap().remove("Rules");
            }),
            ("bucket-public", |t| {
                let st = &mut t["Resources"]["SecretsBucketPolicy"]["Properties"]["PolicyDocument"]
                    ["Statement"][0];
                st["Effect"] = "Allow".into();
                st["Principal"] = serde_json::json!({"AWS": ["arn:aws:iam::1:root", "*"]});
            }),
            ("volume-unencrypted", |t| {
                t["Resources"]["NodeLaunchTemplate"]["Properties"]["LaunchTemplateData"]
                    .as_object_mut()
                    .unwrap()
                    .remove("BlockDeviceMappings");
            }),
            ("volume-unencrypted", |t| {
                t["Resources"]["MasterLaunchTemplate"]["Properties"]["LaunchTemplateData"]
                    ["BlockDeviceMappings"][0]["Ebs"]["Encrypted"] = false.into()
            }),
            ("bucket-public", |t| {
                t["Resources"]["SecretsBucket"]["Properties"]["PublicAccessBlockConfiguration"]
                    ["RestrictPublicBuckets"] = false.into()
            }),
            ("bucket-public", |t| {
                t["Resources"]["SecretsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
                    [0]["Effect"] = "Allow".into()
            }),
            ("volume-unencrypted", |t| {
                t["Resources"]["MasterVolume"]["Properties"]["Encrypted"] = false.into()
            }),
            ("iam-wildcard", |t| {
                t["Resources"]["NodeRole"]["Properties"]["Policies"][0]["PolicyDocument"]
                    ["Statement"][0]["Action"] = "ec2:*".into()
            }),
            ("iam-wildcard", |t| {
                t["Resources"]["MasterRole"]["Properties"]["Policies"][0]["PolicyDocument"]
                    ["Statement"][1]["Action"] = "*".into()
            }),
            ("rolling-update", |t| {
                t["Resources"]["NodeGroup"]
                    .as_object_mut()
                    .unwrap()
                    .remove("UpdatePolicy");
            }),
            ("rolling-update", |t| {
                t["Resources"]["NodeGroup"]["UpdatePolicy"]["AutoScalingRollingUpdate"]
                    ["WaitOnResourceSignals"] = false.into()
            }),
            ("rolling-update", |t| {
                t["Resources"]["NodeGroup"]["DependsOn"] = serde_json::json!(["SubnetBRoutes"])
            }),
            ("rolling-update", |t| {
                t["Resources"]["NodeGroup"]
                    .as_object_mut()
                    .unwrap()
                    .remove("CreationPolicy");
            }),
            ("rolling-update", |t| {
                drop_tag(
                    &mut t["Resources"]["NodeLaunchTemplate"]["Properties"]["LaunchTemplateData"]
                        ["TagSpecifications"][0]["Tags"],
                    "slipway:release",
                );
            }),
            ("volume-backups", |t| {
                t["Resources"]
                    .as_object_mut()
                    .unwrap()
                    .remove("MasterVolumeSnapshots");
            }),
            ("volume-backups", |t| {
                t["Resources"]["MasterVolumeSnapshots"]["Properties"]["State"] = "DISABLED".into()
            }),
            ("volume-backups", |t| {
                t["Resources"]["MasterVolumeSnapshots"]["Properties"]["PolicyDetails"]["Schedules"]
                    [0]
                .as_object_mut()
                .unwrap()
                .remove("RetainRule");
            }),
            ("volume-backups", |t| {
                // The volume loses the tag the policy targets.
                drop_tag(
                    &mut t["Resources"]["MasterVolume"]["Properties"]["Tags"],
                    "slipway:etcd-data",
                );
            }),
        ];
        for (rule, mutate) in cases {
            let mut t = template();
            mutate(&mut t);
            assert_eq!(rules_fired(&t), vec![rule], "{:?}", check(&t));
        }
    }

    /// Each way a master group could run two masters during an update.
    #[test]
    fn a_master_group_that_could_run_two_masters_is_refused() {
        type Mutation = fn(&mut Value);
        let two_masters: Vec<(&str, Mutation)> = vec![
            ("a master kept in service", |g| {
                g["UpdatePolicy"]["AutoScalingRollingUpdate"]["MinInstancesInService"] = 1.into()
            }),
            ("two at a time", |g| {
                g["UpdatePolicy"]["AutoScalingRollingUpdate"]["MaxBatchSize"] = "2".into()
            }),
            ("room for two", |g| g["Properties"]["MaxSize"] = "2".into()),
            (
                "a replacing update",
                |g| {
                    g["UpdatePolicy"] =
                        serde_json::json!({"AutoScalingReplacingUpdate": {"WillReplace": true}})
                },
            ),
        ];
        for (what, mutate) in two_masters {
            let mut t = template();
            mutate(&mut t["Resources"]["MasterGroup"]);
            let found = check(&t);
            assert!(
                found
                    .iter()
                    .any(|v| v.rule == "rolling-update" && v.resource == "MasterGroup"),
                "{what}: {found:?}"
            );
        }
        // The same settings on the node group are a choice, not a violation.
        let mut t = template();
        let nodes = &mut t["Resources"]["NodeGroup"];
        nodes["UpdatePolicy"]["AutoScalingRollingUpdate"]["MinInstancesInService"] = 1.into();
        nodes["UpdatePolicy"]["AutoScalingRollingUpdate"]["MaxBatchSize"] = "2".into();
        assert_eq!(check(&t), vec![]);
    }

    /// A template rule's condition or assertion evaluated over parameter
    /// values, as CloudFormation does before it creates or updates a stack
    /// (moto skips `Rules`): `Ref`, `Fn::Equals`, `Fn::Not`, `Fn::And`, `Fn::Or`.
    fn holds(expr: &Value, params: &serde_json::Map<String, Value>) -> bool {
        fn value(e: &Value, params: &serde_json::Map<String, Value>) -> Value {
            match e["Ref"].as_str() {
                Some(p) => params[p].clone(),
                None => e.clone(),
            }
        }
        let (f, args) = expr.as_object().unwrap().iter().next().unwrap();
        let args = args.as_array().unwrap();
        match f.as_str() {
            "Fn::Equals" => value(&args[0], params) == value(&args[1], params),
            "Fn::Not" => !holds(&args[0], params),
            "Fn::And" => args.iter().all(|a| holds(a, params)),
            "Fn::Or" => args.iter().any(|a| holds(a, params)),
            other => panic!("{other} in a template rule is not modelled"),
        }
    }

    /// The descriptions of the assertions `params` break.
    fn refused(t: &Value, params: &Value) -> Vec<String> {
        let params = params.as_object().unwrap();
        let mut out = Vec::new();
        for rule in t["Rules"].as_object().unwrap().values() {
            if !rule["RuleCondition"].is_null() && !holds(&rule["RuleCondition"], params) {
                continue;
            }
            for a in as_list(&rule["Assertions"]) {
                if !holds(&a["Assert"], params) {
                    out.push(a["AssertDescription"].as_str().unwrap().to_owned());
                }
            }
        }
        out
    }

    #[test]
    fn the_api_opens_to_the_world_only_when_asked_template_rules_evaluated_here() {
        let t = template();
        let world = serde_json::json!({"AdminCidr": "0.0.0.0/0", "AllowApiFromAnywhere": "false"});
        let why = refused(&t, &world);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("AllowApiFromAnywhere"), "{why:?}");
        let asked = serde_json::json!({"AdminCidr": "0.0.0.0/0", "AllowApiFromAnywhere": "true"});
        assert_eq!(refused(&t, &asked), Vec::<String>::new());
        let office =
            serde_json::json!({"AdminCidr": "203.0.113.0/24", "AllowApiFromAnywhere": "false"});
        assert_eq!(refused(&t, &office), Vec::<String>::new());
    }
}
