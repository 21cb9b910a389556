//! A small IAM policy evaluator: the part of AWS's evaluation that the
//! local AWS skips (conditions, resource ARNs outside S3, bucket policies),
//! for one account. It is a stand-in for AWS and says so: tests that use it
//! carry `own_evaluator` in their names.
//!
//! Modelled: `Effect`, `Action`/`NotAction` (case-insensitive, with `*` and
//! `?`), `Resource`/`NotResource`, a resource policy's `Principal` (`*`,
//! `{"AWS": …}`), condition operators `String[Not]Equals`,
//! `String[Not]Like`, `Arn[Not]Equals`, `Arn[Not]Like`, `Bool` (each also
//! with `IfExists`), the set qualifiers `ForAllValues:` and `ForAnyValue:`
//! on the positive operators over multivalued keys (`aws:TagKeys`), and
//! policy variables (`${ec2:SourceInstanceARN}`) in condition values. An explicit Deny in any policy wins; otherwise an
//! Allow in the identity's policies or in the resource's policy (for that
//! principal) allows ([`evaluate`], S3's rule within one account). A KMS
//! key is stricter ([`evaluate_key`]): its policy must allow, either the
//! principal itself or the account, and then the identity's policies must
//! allow too. A principal is matched by its own ARN or by its role's
//! (`aws:PrincipalArn`). Anything else in a policy is an error, never a
//! silent pass.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;

/// One call as AWS authorizes it: who, what, on which resource, with which
/// context keys (`aws:PrincipalArn`, `aws:ResourceTag/…`, `s3:prefix`, …).
#[derive(Debug, Clone)]
pub struct Request {
    pub principal: String,
    pub action: String,
    pub resource: String,
    pub context: BTreeMap<String, String>,
    /// Multivalued context keys (`aws:TagKeys`).
    pub sets: BTreeMap<String, Vec<String>>,
}

impl Request {
    pub fn new(principal: &str, action: &str, resource: &str) -> Self {
        Self {
            principal: principal.to_owned(),
            action: action.to_owned(),
            resource: resource.to_owned(),
            context: BTreeMap::new(),
            sets: BTreeMap::new(),
        }
    }

    /// The request with multivalued context key `key` set to `values`.
    pub fn with_set(mut self, key: &str, values: &[&str]) -> Self {
        self.sets.insert(
            key.to_owned(),
            values.iter().map(|v| (*v).to_owned()).collect(),
        );
        self
    }

    /// The request with context key `key` set to `value`.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.context.insert(key.to_owned(), value.to_owned());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No statement allows it.
    ImplicitDeny,
    /// A Deny statement matched (its Sid, or its position).
    ExplicitDeny(String),
}

/// The decision for `request` under the identity's `policies` and the
/// resource's `resource_policy`, if it has one.
pub fn evaluate(
    policies: &[Value],
    resource_policy: Option<&Value>,
    request: &Request,
) -> Result<Decision> {
    let identity = allows(policies, false, request)?;
    let resource = match resource_policy {
        Some(r) => allows(std::slice::from_ref(r), true, request)?,
        None => Verdict::default(),
    };
    if let Some(sid) = identity.denied.or(resource.denied) {
        return Ok(Decision::ExplicitDeny(sid));
    }
    Ok(if identity.allowed || resource.allowed {
        Decision::Allow
    } else {
        Decision::ImplicitDeny
    })
}

/// The decision for `request` on a KMS key with policy `key_policy`.
pub fn evaluate_key(policies: &[Value], key_policy: &Value, request: &Request) -> Result<Decision> {
    let identity = allows(policies, false, request)?;
    let key = allows(std::slice::from_ref(key_policy), true, request)?;
    if let Some(sid) = identity.denied.or(key.denied) {
        return Ok(Decision::ExplicitDeny(sid));
    }
    let allowed = key.allowed_directly || (key.allowed && identity.allowed);
    Ok(if allowed {
        Decision::Allow
    } else {
        Decision::ImplicitDeny
    })
}

/// What a set of policies says about a request.
#[derive(Debug, Default)]
struct Verdict {
    /// An Allow matched.
    allowed: bool,
    /// An Allow matched that names the principal itself (not its account).
    allowed_directly: bool,
    /// A Deny matched: its Sid, or its position.
    denied: Option<String>,
}

fn allows(documents: &[Value], is_resource_policy: bool, request: &Request) -> Result<Verdict> {
    let mut verdict = Verdict::default();
    for document in documents {
        for (i, st) in statements(document)?.iter().enumerate() {
            if !applies(st, is_resource_policy, request)? {
                continue;
            }
            match st["Effect"].as_str() {
                Some("Deny") => {
                    let sid = st["Sid"]
                        .as_str()
                        .map_or_else(|| format!("#{i}"), str::to_owned);
                    verdict.denied.get_or_insert(sid);
                }
                Some("Allow") => {
                    verdict.allowed = true;
                    if !is_resource_policy || !names_an_account(&st["Principal"]) {
                        verdict.allowed_directly = true;
                    }
                }
                other => bail!("a statement with Effect {other:?}"),
            }
        }
    }
    Ok(verdict)
}

/// Whether a resource policy's principal is an account (`…:root`), which
/// leaves the decision to that account's IAM policies.
fn names_an_account(principal: &Value) -> bool {
    strings(&principal["AWS"]).is_ok_and(|list| list.iter().any(|p| p.ends_with(":root")))
}

fn statements(document: &Value) -> Result<Vec<&Value>> {
    match &document["Statement"] {
        Value::Array(list) => Ok(list.iter().collect()),
        st @ Value::Object(_) => Ok(vec![st]),
        other => bail!("a policy whose Statement is {other}"),
    }
}

/// Whether `st` speaks about this request: principal, action, resource
/// and every condition.
fn applies(st: &Value, is_resource_policy: bool, request: &Request) -> Result<bool> {
    for key in st
        .as_object()
        .context("a statement that is not an object")?
        .keys()
    {
        let known = [
            "Sid",
            "Effect",
            "Action",
            "NotAction",
            "Resource",
            "NotResource",
            "Principal",
            "Condition",
        ];
        if !known.contains(&key.as_str()) {
            bail!("statement element {key} is not modelled");
        }
    }
    if is_resource_policy && !principal_matches(&st["Principal"], request)? {
        return Ok(false);
    }
    let action = match (&st["Action"], &st["NotAction"]) {
        (Value::Null, Value::Null) => bail!("a statement without Action or NotAction"),
        (a, Value::Null) => any_matches(a, &request.action, true)?,
        (Value::Null, n) => !any_matches(n, &request.action, true)?,
        _ => bail!("a statement with both Action and NotAction"),
    };
    if !action {
        return Ok(false);
    }
    let resource = match (&st["Resource"], &st["NotResource"]) {
        (Value::Null, Value::Null) => is_resource_policy,
        (r, Value::Null) => any_matches(r, &request.resource, false)?,
        (Value::Null, n) => !any_matches(n, &request.resource, false)?,
        _ => bail!("a statement with both Resource and NotResource"),
    };
    if !resource {
        return Ok(false);
    }
    conditions_hold(&st["Condition"], request)
}

fn principal_matches(principal: &Value, request: &Request) -> Result<bool> {
    let role = request.context.get("aws:PrincipalArn");
    let account = request.principal.split(':').nth(4).unwrap_or_default();
    Ok(match principal {
        Value::String(s) if s == "*" => true,
        Value::Object(map) => match map.get("AWS") {
            Some(aws) => strings(aws)?.iter().any(|p| {
                p == "*"
                    || *p == request.principal
                    || Some(p) == role
                    || p.strip_suffix(":root")
                        .is_some_and(|a| a.rsplit(':').next() == Some(account))
            }),
            None => false,
        },
        Value::Null => bail!("a resource policy statement without Principal"),
        other => bail!("a Principal of shape {other} is not modelled"),
    })
}

fn strings(v: &Value) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Bool(b) => Ok(vec![b.to_string()]),
        Value::Array(list) => list.iter().map(|x| Ok(strings(x)?.concat())).collect(),
        other => bail!("expected a string or a list of strings, found {other}"),
    }
}

fn any_matches(patterns: &Value, value: &str, ignore_case: bool) -> Result<bool> {
    Ok(strings(patterns)?.iter().any(|p| {
        if ignore_case {
            glob(&p.to_ascii_lowercase(), &value.to_ascii_lowercase())
        } else {
            glob(p, value)
        }
    }))
}

/// `*` matches any run of characters, `?` any one character.
pub fn glob(pattern: &str, value: &str) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    // Classic two-pointer wildcard match with backtracking to the last `*`.
    let (mut pi, mut vi, mut star, mut mark) = (0, 0, None, 0);
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `${key}` in a condition value replaced by the request's value; `None`
/// when the request lacks the key (the value then matches nothing).
fn with_variables(value: &str, context: &BTreeMap<String, String>) -> Option<String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}')? + start;
        out.push_str(context.get(&rest[start + 2..end])?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn conditions_hold(condition: &Value, request: &Request) -> Result<bool> {
    let context = &request.context;
    let Some(operators) = condition.as_object() else {
        return match condition {
            Value::Null => Ok(true),
            other => bail!("a Condition of shape {other}"),
        };
    };
    for (operator, keys) in operators {
        let (set, operator) = match operator.split_once(':') {
            Some((set @ ("ForAllValues" | "ForAnyValue"), op)) => (Some(set), op),
            Some((other, _)) => bail!("set qualifier {other} is not modelled"),
            None => (None, operator.as_str()),
        };
        let (base, if_exists) = match operator.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (operator, false),
        };
        let (negated, compare): (bool, fn(&str, &str) -> bool) = match base {
            "StringEquals" | "ArnEquals" | "Bool" => (false, |p, v| p == v),
            "StringNotEquals" | "ArnNotEquals" => (true, |p, v| p == v),
            "StringLike" | "ArnLike" => (false, glob),
            "StringNotLike" | "ArnNotLike" => (true, glob),
            other => bail!("condition operator {other} is not modelled"),
        };
        if set.is_some() && (negated || if_exists) {
            bail!("{operator} with a set qualifier is not modelled");
        }
        for (key, values) in keys
            .as_object()
            .context("a condition operator without keys")?
        {
            let patterns: Vec<String> = strings(values)?
                .iter()
                .filter_map(|p| with_variables(p, context))
                .collect();
            let matches = |actual: &str| patterns.iter().any(|p| compare(p, actual));
            let holds = match set {
                // Every value in the request's set is allowed (an absent
                // or empty set holds, as on AWS).
                Some("ForAllValues") => request
                    .sets
                    .get(key)
                    .map_or(true, |vs| vs.iter().all(|v| matches(v))),
                Some(_) => request
                    .sets
                    .get(key)
                    .is_some_and(|vs| vs.iter().any(|v| matches(v))),
                None => {
                    if request.sets.contains_key(key) {
                        bail!("{key} is multivalued: {operator} needs ForAllValues or ForAnyValue");
                    }
                    match context.get(key) {
                        None => negated || if_exists,
                        Some(actual) => matches(actual) != negated,
                    }
                }
            };
            if !holds {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcards() {
        assert!(glob(
            "arn:aws:s3:::b/demo/*",
            "arn:aws:s3:::b/demo/pki.json"
        ));
        assert!(!glob(
            "arn:aws:s3:::b/demo/node.json",
            "arn:aws:s3:::b/demo/pki.json"
        ));
        assert!(glob("a?c*", "abcdef"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*", ""));
    }

    #[test]
    fn deny_wins_and_silence_denies() {
        let allow =
            json!({"Statement": [{"Effect": "Allow", "Action": "s3:Get*", "Resource": "*"}]});
        let deny = json!({"Statement": [{"Sid": "No", "Effect": "Deny", "Principal": "*",
            "Action": "s3:*", "Resource": "arn:aws:s3:::b/*",
            "Condition": {"ArnNotLike": {"aws:PrincipalArn": ["arn:aws:iam::1:role/ok"]}}}]});
        let get = |who: &str| {
            Request::new(who, "s3:GetObject", "arn:aws:s3:::b/k").with("aws:PrincipalArn", who)
        };
        let ok = "arn:aws:iam::1:role/ok";
        assert_eq!(
            evaluate(std::slice::from_ref(&allow), Some(&deny), &get(ok)).unwrap(),
            Decision::Allow
        );
        assert_eq!(
            evaluate(
                std::slice::from_ref(&allow),
                Some(&deny),
                &get("arn:aws:iam::1:user/x")
            )
            .unwrap(),
            Decision::ExplicitDeny("No".into())
        );
        assert_eq!(
            evaluate(
                &[allow],
                None,
                &Request::new(ok, "s3:PutObject", "arn:aws:s3:::b/k")
            )
            .unwrap(),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn conditions_with_variables_and_missing_keys() {
        let own = json!({"Statement": [{"Effect": "Allow", "Action": "ec2:ModifyInstanceAttribute",
            "Resource": "*", "Condition": {"StringEquals": {"aws:ARN": "${ec2:SourceInstanceARN}"}}}]});
        let me = "arn:aws:ec2:r:1:instance/i-1";
        let req = |target: &str| {
            Request::new("p", "ec2:ModifyInstanceAttribute", target)
                .with("aws:ARN", target)
                .with("ec2:SourceInstanceARN", me)
        };
        assert_eq!(
            evaluate(std::slice::from_ref(&own), None, &req(me)).unwrap(),
            Decision::Allow
        );
        let other = "arn:aws:ec2:r:1:instance/i-2";
        assert_eq!(
            evaluate(std::slice::from_ref(&own), None, &req(other)).unwrap(),
            Decision::ImplicitDeny
        );
        // Without the variable (not an instance's credentials) nothing matches.
        let bare = Request::new("p", "ec2:ModifyInstanceAttribute", me).with("aws:ARN", me);
        assert_eq!(
            evaluate(&[own], None, &bare).unwrap(),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn set_qualifiers_over_multivalued_keys() {
        let only = json!({"Statement": [{"Effect": "Allow", "Action": "ec2:CreateTags",
            "Resource": "*", "Condition": {"ForAllValues:StringEquals": {"aws:TagKeys": ["a", "b"]}}}]});
        let any = json!({"Statement": [{"Effect": "Allow", "Action": "ec2:CreateTags",
            "Resource": "*", "Condition": {"ForAnyValue:StringEquals": {"aws:TagKeys": "a"}}}]});
        let req =
            |keys: &[&str]| Request::new("p", "ec2:CreateTags", "r").with_set("aws:TagKeys", keys);
        let decide =
            |policy: &Value, r: &Request| evaluate(std::slice::from_ref(policy), None, r).unwrap();
        assert_eq!(decide(&only, &req(&["a"])), Decision::Allow);
        assert_eq!(decide(&only, &req(&["a", "b"])), Decision::Allow);
        assert_eq!(decide(&only, &req(&["a", "c"])), Decision::ImplicitDeny);
        // ForAllValues holds for an absent key, as on AWS.
        assert_eq!(
            decide(&only, &Request::new("p", "ec2:CreateTags", "r")),
            Decision::Allow
        );
        assert_eq!(decide(&any, &req(&["c", "a"])), Decision::Allow);
        assert_eq!(decide(&any, &req(&["c"])), Decision::ImplicitDeny);
        assert_eq!(
            decide(&any, &Request::new("p", "ec2:CreateTags", "r")),
            Decision::ImplicitDeny
        );
        // A single-valued operator over a set is a policy mistake.
        let plain = json!({"Statement": [{"Effect": "Allow", "Action": "ec2:CreateTags",
            "Resource": "*", "Condition": {"StringEquals": {"aws:TagKeys": "a"}}}]});
        assert!(evaluate(&[plain], None, &req(&["a"])).is_err());
    }

    #[test]
    fn a_key_allows_its_principals_directly_and_the_account_only_with_iam() {
        let key = json!({"Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:role/r"},
             "Action": "kms:Decrypt", "Resource": "*"},
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::1:root"},
             "Action": "kms:Describe*", "Resource": "*"}]});
        let session = "arn:aws:sts::1:assumed-role/r/i-1";
        let req = |action: &str| {
            Request::new(session, action, "k").with("aws:PrincipalArn", "arn:aws:iam::1:role/r")
        };
        // The role's session, by the role's ARN, with no IAM policy at all.
        assert_eq!(
            evaluate_key(&[], &key, &req("kms:Decrypt")).unwrap(),
            Decision::Allow
        );
        // The account: only with an identity policy that allows it too.
        assert_eq!(
            evaluate_key(&[], &key, &req("kms:DescribeKey")).unwrap(),
            Decision::ImplicitDeny
        );
        let iam = json!({"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]});
        assert_eq!(
            evaluate_key(std::slice::from_ref(&iam), &key, &req("kms:DescribeKey")).unwrap(),
            Decision::Allow
        );
        // Nothing grants Encrypt, whatever IAM says.
        assert_eq!(
            evaluate_key(&[iam], &key, &req("kms:Encrypt")).unwrap(),
            Decision::ImplicitDeny
        );
    }

    #[test]
    fn what_is_not_modelled_is_an_error() {
        let odd = json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*",
            "Condition": {"NumericLessThan": {"x": "1"}}}]});
        let err = evaluate(&[odd], None, &Request::new("p", "s3:GetObject", "r")).unwrap_err();
        assert!(err.to_string().contains("NumericLessThan"), "{err}");
    }
}
