//! IAM switched on in the local AWS: identities for the test and for each
//! member, made before [`Moto::enforce_iam`]; after it, moto checks every
//! call's signature and the caller's identity policies, and refuses what
//! they do not allow with an `AccessDenied` that names the action.
//!
//! What moto leaves out, and how the policies are shown to it (a stand-in,
//! so tests that rely on it say so; conditions and resource scoping are
//! checked a second way, by evaluating the template's own policies):
//! - conditions: moto has none of the context keys AWS supplies
//!   (`aws:ResourceTag/…`, `ec2:SourceInstanceARN`, `s3:prefix`) and takes
//!   an unmet condition on an Allow for a Deny, so [`moto_view`] drops them;
//! - resources outside S3: moto checks every non-S3 call against `*`, so
//!   [`moto_view`] widens those statements' resources to `*`.
//!
//! Action names and S3 bucket and object ARNs are enforced as written.

use crate::moto::Moto;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

/// moto's account.
pub const ACCOUNT: &str = "123456789012";

/// Credentials of one identity in the local AWS.
#[derive(Debug, Clone)]
pub struct Identity {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Present for an assumed role.
    pub session_token: Option<String>,
    /// The identity's ARN (for an assumed role, its session's ARN).
    pub arn: String,
}

impl Identity {
    /// For an SDK config (`credentials_provider`).
    pub fn credentials(&self) -> aws_sdk_s3::config::Credentials {
        aws_sdk_s3::config::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            self.session_token.clone(),
            None,
            "slipway-test-iam",
        )
    }

    /// The variables the SDK's environment provider reads, for a child
    /// process that should run as this identity.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
        ];
        if let Some(t) = &self.session_token {
            vars.push(("AWS_SESSION_TOKEN", t.clone()));
        }
        vars
    }

    /// The instance profile credentials document the metadata service
    /// serves for this identity.
    pub fn imds_document(&self) -> String {
        json!({
            "Code": "Success",
            "LastUpdated": "2026-01-01T00:00:00Z",
            "Type": "AWS-HMAC",
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token.clone().unwrap_or_default(),
            "Expiration": "2099-01-01T00:00:00Z",
        })
        .to_string()
    }
}

impl Moto {
    /// Switches authorization on: from now on every call must be signed
    /// by a known identity and allowed by its policies.
    pub fn enforce_iam(&self) -> Result<()> {
        // Idempotent: tried again if the connection is reset.
        let mut answer = post(&self.endpoint, "/moto-api/reset-auth", &[], "0");
        for attempt in 1..=4u64 {
            if answer.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200 * attempt));
            answer = post(&self.endpoint, "/moto-api/reset-auth", &[], "0");
        }
        let (status, body) = answer.context("switching moto's IAM enforcement on")?;
        ensure!(
            status == 200,
            "moto refused to enforce IAM: {status} {body}"
        );
        Ok(())
    }

    /// Switches authorization off for a while (moto lets the next
    /// `requests` calls through unsigned and unevaluated), for work that
    /// cannot sign as the administrator; [`Moto::enforce_iam`] ends it.
    pub fn relax_iam(&self, requests: u32) -> Result<()> {
        let (status, body) = post(
            &self.endpoint,
            "/moto-api/reset-auth",
            &[],
            &requests.to_string(),
        )
        .context("switching moto's IAM enforcement off")?;
        ensure!(status == 200, "moto refused to relax IAM: {status} {body}");
        Ok(())
    }

    /// An IAM user allowed everything: the test's own calls (setting up,
    /// looking) once IAM is enforced. Call before [`Moto::enforce_iam`].
    pub fn administrator(&self) -> Result<Identity> {
        let user = "slipway-test-administrator";
        self.query("iam", &[("Action", "CreateUser"), ("UserName", user)])?;
        let all = json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "*", "Resource": "*"}]});
        self.query(
            "iam",
            &[
                ("Action", "PutUserPolicy"),
                ("UserName", user),
                ("PolicyName", "everything"),
                ("PolicyDocument", &all.to_string()),
            ],
        )?;
        let key = self.query("iam", &[("Action", "CreateAccessKey"), ("UserName", user)])?;
        Ok(Identity {
            access_key_id: element(&key, "AccessKeyId")?,
            secret_access_key: element(&key, "SecretAccessKey")?,
            session_token: None,
            arn: format!("arn:aws:iam::{ACCOUNT}:user/{user}"),
        })
    }

    /// Creates role `name` with `policies` (name, document) as EC2 instances
    /// would use it. Call before [`Moto::enforce_iam`].
    pub fn create_role(&self, name: &str, policies: &[(String, Value)]) -> Result<()> {
        let trust = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]});
        self.query(
            "iam",
            &[
                ("Action", "CreateRole"),
                ("RoleName", name),
                ("AssumeRolePolicyDocument", &trust.to_string()),
            ],
        )?;
        self.put_role_policies(name, policies)
    }

    /// Sets (replaces) `role`'s inline policies of these names.
    pub fn put_role_policies(&self, role: &str, policies: &[(String, Value)]) -> Result<()> {
        for (policy, document) in policies {
            self.query(
                "iam",
                &[
                    ("Action", "PutRolePolicy"),
                    ("RoleName", role),
                    ("PolicyName", policy),
                    ("PolicyDocument", &document.to_string()),
                ],
            )?;
        }
        Ok(())
    }

    /// Credentials of `role` as EC2 hands them to an instance (a session
    /// of the assumed role). Call before [`Moto::enforce_iam`].
    pub fn assume_role(&self, role: &str, session: &str) -> Result<Identity> {
        let arn = format!("arn:aws:iam::{ACCOUNT}:role/{role}");
        let out = self.query(
            "sts",
            &[
                ("Action", "AssumeRole"),
                ("RoleArn", &arn),
                ("RoleSessionName", session),
                ("DurationSeconds", "43200"),
            ],
        )?;
        Ok(Identity {
            access_key_id: element(&out, "AccessKeyId")?,
            secret_access_key: element(&out, "SecretAccessKey")?,
            session_token: Some(element(&out, "SessionToken")?),
            arn: element(&out, "Arn")?,
        })
    }

    /// One unsigned query-API call (IAM, STS), which moto answers while it
    /// does not enforce IAM: the response body, or the error moto gave.
    fn query(&self, service: &str, params: &[(&str, &str)]) -> Result<String> {
        let version = match service {
            "iam" => "2010-05-08",
            "sts" => "2011-06-15",
            other => bail!("no query API version known for {other}"),
        };
        let mut body = format!("Version={version}");
        for (k, v) in params {
            body.push_str(&format!("&{k}={}", form_encode(v)));
        }
        // moto tells services apart by the credential scope.
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=setup/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0"
        );
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        let action = params
            .iter()
            .find(|(k, _)| *k == "Action")
            .map_or("?", |(_, v)| *v);
        // A moto busy starting beside other tests' now and then resets a
        // connection; the call is tried again, and a create whose first
        // answer was lost counts as done when the retry finds it done.
        let mut lost = None;
        for attempt in 1..=5u64 {
            match post(&self.endpoint, "/", &headers, &body) {
                Ok((200, text)) => return Ok(text),
                Ok((_, text)) if lost.is_some() && text.contains("EntityAlreadyExists") => {
                    return Ok(text)
                }
                Ok((status, text)) => bail!("{service}:{action} answered {status}: {text}"),
                Err(e) => {
                    lost = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(200 * attempt));
                }
            }
        }
        let e = lost.context("no attempt made")?;
        Err(e.context(format!("{service}:{action}: no answer in 5 attempts")))
    }
}

/// The text of the first `<name>` element of an XML answer.
fn element(xml: &str, name: &str) -> Result<String> {
    let open = format!("<{name}>");
    let start = xml
        .find(&open)
        .with_context(|| format!("no <{name}> in {xml}"))?
        + open.len();
    let end = xml[start..]
        .find(&format!("</{name}>"))
        .with_context(|| format!("<{name}> not closed in {xml}"))?;
    Ok(xml[start..start + end].to_owned())
}

fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A plain HTTP/1.1 POST with `Connection: close`: status and body.
fn post(endpoint: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<(u16, String)> {
    http("POST", endpoint, path, headers, body)
}

/// A plain HTTP/1.1 request with `Connection: close`: status and body.
pub(crate) fn http(
    method: &str,
    endpoint: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let host = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("{endpoint}: only http:// is spoken here"))?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, text) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("a response without a body from {host}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head}"))?;
    Ok((status, text.to_owned()))
}

/// The inline policies (name, document) of the role `logical` in a
/// template, as written (intrinsic functions unresolved).
pub fn template_policies(template: &Value, logical: &str) -> Result<Vec<(String, Value)>> {
    let policies = template["Resources"][logical]["Properties"]["Policies"]
        .as_array()
        .with_context(|| format!("{logical} has no inline policies"))?;
    policies
        .iter()
        .map(|p| {
            let name = p["PolicyName"]
                .as_str()
                .with_context(|| format!("{logical}: a policy without a name"))?;
            Ok((name.to_owned(), p["PolicyDocument"].clone()))
        })
        .collect()
}

/// A policy as moto can enforce it (see the module's notes): conditions
/// dropped, every statement that is not only about S3 allowed on `*`.
pub fn moto_view(document: &Value) -> Value {
    let mut doc = document.clone();
    if let Some(statements) = doc["Statement"].as_array_mut() {
        for st in statements {
            let actions: Vec<&str> = match &st["Action"] {
                Value::String(a) => vec![a.as_str()],
                Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let only_s3 = !actions.is_empty() && actions.iter().all(|a| a.starts_with("s3:"));
            if let Some(map) = st.as_object_mut() {
                map.remove("Condition");
                if !only_s3 {
                    map.insert("Resource".into(), Value::String("*".into()));
                }
            }
        }
    }
    doc
}

/// `value` with CloudFormation's `Ref`, `Fn::GetAtt`, `Fn::Sub` (the
/// string form), `Fn::Join`, `Fn::Split` and `Fn::If` resolved from `names`
/// (`ClusterName`, `AWS::Region`, `SecretsBucket.Arn`, a condition as
/// `Condition:HasKeyName` = `true`/`false`; a list parameter's value as a
/// JSON list). A name it does not know is an error.
pub fn resolve(value: &Value, names: &BTreeMap<String, String>) -> Result<Value> {
    let lookup = |name: &str| {
        names
            .get(name)
            .cloned()
            .with_context(|| format!("the template refers to {name}, which the test does not know"))
    };
    Ok(match value {
        Value::Object(map) if map.len() == 1 => {
            let (key, arg) = map.iter().next().context("a one-entry map")?;
            match key.as_str() {
                "Ref" => {
                    let value = lookup(arg.as_str().context("Ref of a non-string")?)?;
                    // A list parameter's value is given as a JSON list.
                    match serde_json::from_str::<Value>(&value) {
                        Ok(list @ Value::Array(_)) => list,
                        _ => Value::String(value),
                    }
                }
                "Fn::GetAtt" => {
                    let parts: Vec<&str> = match arg {
                        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                        Value::String(s) => s.splitn(2, '.').collect(),
                        _ => bail!("Fn::GetAtt of {arg}"),
                    };
                    Value::String(lookup(&parts.join("."))?)
                }
                "Fn::Sub" => {
                    let text = arg
                        .as_str()
                        .context("only Fn::Sub's string form is resolved")?;
                    Value::String(substitute(text, &lookup)?)
                }
                "Fn::Join" => {
                    let (sep, list) = pair(arg, "Fn::Join")?;
                    let items = match resolve(list, names)? {
                        Value::Array(items) => items
                            .iter()
                            .map(|i| i.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                            .context("Fn::Join of a non-string")?,
                        // A list parameter, as its comma-joined value.
                        Value::String(joined) => vec![joined],
                        other => bail!("Fn::Join of {other}"),
                    };
                    Value::String(items.join(sep.as_str().context("Fn::Join's separator")?))
                }
                "Fn::Split" => {
                    let (sep, text) = pair(arg, "Fn::Split")?;
                    let sep = sep.as_str().context("Fn::Split's separator")?;
                    let text = resolve(text, names)?;
                    let text = text.as_str().context("Fn::Split of a non-string")?;
                    Value::Array(text.split(sep).map(|p| Value::String(p.into())).collect())
                }
                "Fn::If" => {
                    let parts = arg
                        .as_array()
                        .filter(|a| a.len() == 3)
                        .context("Fn::If takes three items")?;
                    let condition = parts[0].as_str().context("Fn::If's condition name")?;
                    match lookup(&format!("Condition:{condition}"))?.as_str() {
                        "true" => resolve(&parts[1], names)?,
                        _ => resolve(&parts[2], names)?,
                    }
                }
                _ => {
                    let mut out = serde_json::Map::new();
                    out.insert(key.clone(), resolve(arg, names)?);
                    Value::Object(out)
                }
            }
        }
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                out.insert(k.clone(), resolve(v, names)?);
            }
            Value::Object(out)
        }
        Value::Array(list) => Value::Array(
            list.iter()
                .map(|v| resolve(v, names))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

/// The two items of an intrinsic function's list argument.
fn pair<'a>(arg: &'a Value, function: &str) -> Result<(&'a Value, &'a Value)> {
    match arg.as_array().map(Vec::as_slice) {
        Some([a, b]) => Ok((a, b)),
        _ => bail!("{function} takes two items, found {arg}"),
    }
}

/// `${Name}` replaced by its value; `${!Literal}` kept as `${Literal}`.
fn substitute(text: &str, lookup: &dyn Fn(&str) -> Result<String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .with_context(|| format!("unclosed ${{ in {text}"))?
            + start;
        let name = &rest[start + 2..end];
        match name.strip_prefix('!') {
            Some(literal) => out.push_str(&format!("${{{literal}}}")),
            // A policy variable (e.g. `${ec2:SourceInstanceARN}`) stays for IAM.
            None if name.contains(':') && !name.starts_with("AWS::") => {
                out.push_str(&format!("${{{name}}}"));
            }
            None => out.push_str(&lookup(name)?),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The hosted zone ID the policies name for the stack's `ApiZone` (moto
/// makes its own; the policy evaluation uses this one).
pub const API_ZONE: &str = "Z0123456789EXAMPLE";

/// The names the template's role policies refer to, for a stack `stack`
/// of cluster `cluster` whose secrets bucket is `bucket`.
pub fn stack_names(
    stack: &str,
    cluster: &str,
    bucket: &str,
    region: &str,
) -> BTreeMap<String, String> {
    [
        ("AWS::Partition", "aws".to_owned()),
        ("AWS::Region", region.to_owned()),
        ("AWS::AccountId", ACCOUNT.to_owned()),
        ("AWS::StackName", stack.to_owned()),
        (
            "AWS::StackId",
            format!(
                "arn:aws:cloudformation:{region}:{ACCOUNT}:stack/{stack}/00000000-0000-0000-0000-000000000000"
            ),
        ),
        ("ClusterName", cluster.to_owned()),
        ("ApiZone", API_ZONE.to_owned()),
        ("SecretsBucket", bucket.to_owned()),
        ("SecretsBucket.Arn", format!("arn:aws:s3:::{bucket}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The role `logical`'s policies from `template`, as moto enforces them.
pub fn moto_policies(
    template: &Value,
    logical: &str,
    names: &BTreeMap<String, String>,
) -> Result<Vec<(String, Value)>> {
    template_policies(template, logical)?
        .into_iter()
        .map(|(name, doc)| Ok((name, resolve(&moto_view(&doc), names)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_go_and_only_s3_statements_keep_their_resources() {
        let doc = json!({"Statement": [
            {"Effect": "Allow", "Action": "ec2:AttachVolume", "Resource": "arn:aws:ec2:r:a:volume/v",
             "Condition": {"StringEquals": {"aws:ResourceTag/x": "y"}}},
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::b/k",
             "Condition": {"Bool": {"aws:SecureTransport": "true"}}}]});
        let view = moto_view(&doc);
        assert_eq!(view["Statement"][0]["Resource"], "*");
        assert!(view["Statement"][0].get("Condition").is_none());
        assert_eq!(view["Statement"][1]["Resource"], "arn:aws:s3:::b/k");
        assert!(view["Statement"][1].get("Condition").is_none());
    }

    #[test]
    fn intrinsics_resolve_and_unknown_names_are_errors() {
        let names = stack_names("s", "demo", "bkt", "us-east-1");
        let v =
            json!({"Fn::Sub": "${SecretsBucket.Arn}/${ClusterName}/* ${!Kept} ${aws:username}"});
        assert_eq!(
            resolve(&v, &names).unwrap(),
            json!("arn:aws:s3:::bkt/demo/* ${Kept} ${aws:username}")
        );
        assert_eq!(
            resolve(&json!({"Fn::GetAtt": ["SecretsBucket", "Arn"]}), &names).unwrap(),
            json!("arn:aws:s3:::bkt")
        );
        let err = resolve(&json!({"Ref": "Nowhere"}), &names).unwrap_err();
        assert!(err.to_string().contains("Nowhere"), "{err}");
    }
}
