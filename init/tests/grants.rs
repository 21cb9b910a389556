//! The template's instance roles against the calls slipway-init makes
//! (`steps::calls`): each role grants every action its member calls, and
//! nothing its member does not call but the few grants listed below with
//! the reason they are needed. Action names only: resources and
//! conditions are not evaluated here (moto does not evaluate them either).

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use serde_yaml_ng::Value;
use slipway_init::config::Role;
use slipway_init::steps;
use std::collections::BTreeSet;

/// Grants no code calls by name, and why each is needed.
const IMPLIED: &[(&str, &str)] = &[(
    "s3:ListBucket",
    "without it S3 answers a missing key with 403, not 404 (NoSuchKey)",
)];

fn template() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cfn/template.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The actions `role`'s inline policies allow.
fn granted(template: &Value, role: &str) -> BTreeSet<String> {
    let mut actions = BTreeSet::new();
    let policies = template["Resources"][role]["Properties"]["Policies"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{role} has no inline policies"));
    for policy in policies {
        let statements = policy["PolicyDocument"]["Statement"].as_sequence().unwrap();
        for st in statements.iter().filter(|s| s["Effect"] == "Allow") {
            match &st["Action"] {
                Value::String(a) => {
                    actions.insert(a.clone());
                }
                Value::Sequence(list) => {
                    actions.extend(list.iter().filter_map(|a| a.as_str().map(str::to_owned)));
                }
                other => panic!("{role}: an Action of an unexpected shape: {other:?}"),
            }
        }
    }
    actions
}

/// What is wrong with `role`'s grants for a member of `member`: calls not
/// granted, grants not called.
fn mismatch(template: &Value, role: &str, member: Role) -> (Vec<String>, Vec<String>) {
    let grants = granted(template, role);
    let calls = steps::calls(member);
    let missing = calls
        .iter()
        .filter(|c| !grants.contains(**c))
        .map(|c| (*c).to_owned())
        .collect();
    let unused = grants
        .iter()
        .filter(|g| !calls.contains(&g.as_str()) && !IMPLIED.iter().any(|(i, _)| i == g))
        .cloned()
        .collect();
    (missing, unused)
}

#[test]
fn each_role_grants_what_its_member_calls_and_nothing_else() {
    let t = template();
    for (role, member) in [("MasterRole", Role::Master), ("NodeRole", Role::Node)] {
        let (missing, unused) = mismatch(&t, role, member);
        assert!(missing.is_empty(), "{role} lacks {missing:?}");
        assert!(
            unused.is_empty(),
            "{role} grants {unused:?}, which nothing calls"
        );
    }
}

#[test]
fn a_grant_removed_from_the_template_is_named() {
    let mut t = template();
    let statements = t["Resources"]["MasterRole"]["Properties"]["Policies"][0]["PolicyDocument"]
        ["Statement"]
        .as_sequence_mut()
        .unwrap();
    for st in statements.iter_mut() {
        if let Value::Sequence(list) = &mut st["Action"] {
            list.retain(|a| a != "ec2:DetachVolume");
        }
    }
    let (missing, _) = mismatch(&t, "MasterRole", Role::Master);
    assert_eq!(missing, ["ec2:DetachVolume"]);
}
