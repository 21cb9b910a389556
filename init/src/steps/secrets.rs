//! The cluster's secrets, shared through the secrets bucket. The first
//! master to boot generates the PKI and stores it with a conditional put,
//! so two masters racing still end up with one CA; every later master
//! downloads it. Nodes wait for their (smaller) bundle. What arrives is
//! written only below the tmpfs.

use super::{aws_err, Context, Report, StepError};
use crate::pki::{Bundle, Identity};
use crate::retry::{self, Backoff};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;
use std::net::Ipv4Addr;
use std::time::Duration;

pub const STEP: &str = "secrets";
/// The AWS actions a master's secrets step calls (a HEAD is `s3:GetObject`).
pub const MASTER_CALLS: &[&str] = &["s3:GetObject", "s3:PutObject"];
/// The AWS actions a node's secrets step calls.
pub const NODE_CALLS: &[&str] = &["s3:GetObject"];

/// Object keys in the secrets bucket.
pub fn pki_key(cluster: &str) -> String {
    format!("{cluster}/pki.json")
}
pub fn node_key(cluster: &str) -> String {
    format!("{cluster}/node.json")
}
pub fn admin_key(cluster: &str) -> String {
    format!("{cluster}/admin.conf")
}

async fn get(ctx: &Context, key: &str) -> Result<Option<Vec<u8>>, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    match ctx.aws.s3.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => {
            let body = out.body.collect().await.map_err(|e| StepError::Aws {
                action: format!("reading s3://{bucket}/{key}"),
                api: "s3:GetObject",
                message: e.to_string(),
            })?;
            Ok(Some(body.into_bytes().to_vec()))
        }
        Err(e) if e.code() == Some("NoSuchKey") => Ok(None),
        Err(e) => Err(aws_err(
            "s3:GetObject",
            format!("downloading s3://{bucket}/{key}"),
        )(e)),
    }
}

/// Whether `key` exists. Only "not found" means no; any other answer
/// (a refusal included) is an error, never taken for absence.
pub async fn exists(ctx: &Context, key: &str) -> Result<bool, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    match ctx
        .aws
        .s3
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
        Err(e) => Err(aws_err(
            "s3:GetObject",
            format!("looking for s3://{bucket}/{key}"),
        )(e)),
    }
}

/// Puts an object; with `only_if_absent`, returns `false` when it exists.
async fn put(
    ctx: &Context,
    key: &str,
    body: Vec<u8>,
    only_if_absent: bool,
) -> Result<bool, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    let mut req = ctx
        .aws
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .server_side_encryption(ServerSideEncryption::Aes256)
        .body(ByteStream::from(body));
    if only_if_absent {
        req = req.if_none_match("*");
    }
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e) if only_if_absent && e.code() == Some("PreconditionFailed") => Ok(false),
        Err(e) => Err(aws_err(
            "s3:PutObject",
            format!("uploading s3://{bucket}/{key}"),
        )(e)),
    }
}

fn parse(key: &str, bytes: &[u8]) -> Result<Bundle, StepError> {
    serde_json::from_slice(bytes).map_err(|e| StepError::Invalid {
        what: format!("secrets object {key}"),
        message: e.to_string(),
    })
}

fn encode(bundle: &Bundle) -> Vec<u8> {
    serde_json::to_vec(bundle).unwrap_or_default()
}

/// Master: download the cluster's PKI, or generate and store it if this is
/// the cluster's first master. Returns the bundle now on the tmpfs.
pub async fn master(
    ctx: &Context,
    public_ip: Option<Ipv4Addr>,
) -> Result<(Report, Bundle), StepError> {
    let cluster = &ctx.config.cluster_name;
    let key = pki_key(cluster);
    let (bundle, detail) = match get(ctx, &key).await? {
        Some(bytes) => {
            let b = parse(&key, &bytes)?;
            let detail = format!(
                "downloaded the cluster PKI (CA {})",
                &b.ca_fingerprint()?[..16]
            );
            (b, detail)
        }
        None => {
            let generated = Bundle::generate(&Identity {
                cluster_name: cluster.clone(),
                master_ip: ctx.config.master_ip,
                public_ip,
                api_service_ip: ctx.config.api_service_ip(),
            })?;
            if put(ctx, &key, encode(&generated), true).await? {
                let detail = format!(
                    "generated the cluster PKI (CA {})",
                    &generated.ca_fingerprint()?[..16]
                );
                (generated, detail)
            } else {
                // Another master won the race: use its PKI, drop ours.
                let bytes = get(ctx, &key).await?.ok_or_else(|| StepError::Invalid {
                    what: key.clone(),
                    message: "the conditional put failed but the object is missing".into(),
                })?;
                let b = parse(&key, &bytes)?;
                let detail = format!(
                    "lost the race to create the PKI; using the winner's (CA {})",
                    &b.ca_fingerprint()?[..16]
                );
                (b, detail)
            }
        }
    };
    // Node bundle and admin kubeconfig derive from the one PKI; writing them
    // again is harmless and heals a crash between the puts.
    put(
        ctx,
        &node_key(cluster),
        encode(&bundle.node_bundle()?),
        false,
    )
    .await?;
    put(
        ctx,
        &admin_key(cluster),
        bundle.get("admin.conf")?.as_bytes().to_vec(),
        false,
    )
    .await?;
    bundle.write(&ctx.paths.secrets.join("pki"))?;
    let changed = detail.starts_with("generated");
    let report = if changed {
        Report::changed(STEP, detail)
    } else {
        Report::already(STEP, detail)
    };
    Ok((report, bundle))
}

/// Node: wait until the bucket holds the node bundle, then fetch it.
pub async fn node(ctx: &Context, deadline: Duration) -> Result<(Report, Bundle), StepError> {
    let key = node_key(&ctx.config.cluster_name);
    let what = format!("waiting for s3://{}/{key}", ctx.config.secrets_bucket);
    let bytes = retry::until(&what, Backoff::new(deadline), || get(ctx, &key))
        .await
        .map_err(|e| StepError::Wait(e.to_string()))?;
    let bundle = parse(&key, &bytes)?;
    bundle.write(&ctx.paths.secrets.join("pki"))?;
    let detail = format!(
        "fetched the node bundle (CA {})",
        &bundle.ca_fingerprint()?[..16]
    );
    Ok((Report::changed(STEP, detail), bundle))
}
