//! The cluster's secrets, shared through the secrets bucket. The first
//! master to boot generates the PKI and stores it with a conditional put,
//! so two masters racing still end up with one CA; every later master
//! downloads it, and renews its leaf certificates when they are due,
//! writing the bundle back only over the version it read. Nodes wait for
//! their (smaller) bundle. What arrives is written only below the tmpfs.

use super::{aws_err, Context, Master, Report, StepError};
use crate::pki::{self, Bundle, Due, Identity, Validity};
use crate::retry::{self, Backoff};
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
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

/// An object's body and the ETag that names this version of it.
struct Object {
    body: Vec<u8>,
    etag: Option<String>,
}

async fn get(ctx: &Context, key: &str) -> Result<Option<Object>, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    match ctx.aws.s3.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => {
            let etag = out.e_tag().map(str::to_owned);
            let body = out.body.collect().await.map_err(|e| StepError::Aws {
                action: format!("reading s3://{bucket}/{key}"),
                api: "s3:GetObject",
                message: e.to_string(),
            })?;
            Ok(Some(Object {
                body: body.into_bytes().to_vec(),
                etag,
            }))
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

/// When a put may replace what is there.
enum Condition<'a> {
    /// Always (objects derived from the bundle, the same whoever writes).
    Always,
    /// Only if the key is absent (the first master's new PKI).
    Absent,
    /// Only if the object is still the version with this ETag (a renewal
    /// of the bundle read).
    Unchanged(&'a str),
}

/// What a put did.
enum Put {
    /// Stored, as the version with this ETag.
    Stored(Option<String>),
    /// The condition failed: another master wrote first.
    Lost,
}

/// Puts an object under `condition`.
async fn put(
    ctx: &Context,
    key: &str,
    body: Vec<u8>,
    condition: Condition<'_>,
) -> Result<Put, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    let mut req = ctx
        .aws
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body));
    req = match condition {
        Condition::Always => req,
        Condition::Absent => req.if_none_match("*"),
        Condition::Unchanged(etag) => req.if_match(etag),
    };
    let conditional = !matches!(condition, Condition::Always);
    match req.send().await {
        Ok(out) => Ok(Put::Stored(out.e_tag().map(str::to_owned))),
        // S3 answers 409 when a concurrent conditional write is in flight.
        Err(e)
            if conditional
                && matches!(
                    e.code(),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                ) =>
        {
            Ok(Put::Lost)
        }
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

/// How often a renewal reads the bundle again after another master wrote
/// it first, before this attempt gives up (the next one starts afresh).
const RENEWAL_RACES: usize = 5;

/// The bundle as the bucket holds it, and the ETag of that version.
struct Shared {
    bundle: Bundle,
    etag: Option<String>,
}

/// What a master's secrets step did to the shared bundle.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    /// The bundle now on the tmpfs.
    pub bundle: Bundle,
    /// Leaf certificates issued again.
    pub renewed: Vec<Due>,
    /// The ID of the bootstrap token replaced, if it was.
    pub rotated: Option<String>,
}

/// Master: download the cluster's PKI, or generate and store it if this is
/// the cluster's first master; renew its leaf certificates and replace its
/// bootstrap token when they are due. Returns the report and the bundle
/// now on the tmpfs.
pub async fn master(
    ctx: &Master<'_>,
    public_ip: Option<Ipv4Addr>,
) -> Result<(Report, Bundle), StepError> {
    let outcome = master_outcome(ctx, public_ip).await?;
    Ok((outcome.report, outcome.bundle))
}

/// [`master`], saying what changed in the bundle.
pub async fn master_outcome(
    ctx: &Master<'_>,
    public_ip: Option<Ipv4Addr>,
) -> Result<Outcome, StepError> {
    let cluster = &ctx.config.cluster_name;
    let key = pki_key(cluster);
    let id = Identity::of(&ctx.config, public_ip);
    let (shared, mut detail, generated) = match get(ctx, &key).await? {
        Some(object) => {
            let bundle = parse(&key, &object.body)?;
            let detail = format!(
                "downloaded the cluster PKI (CA {})",
                &bundle.ca_fingerprint()?[..16]
            );
            let shared = Shared {
                bundle,
                etag: object.etag,
            };
            (shared, detail, false)
        }
        None => {
            let generated = Bundle::generate_with(&id, &validity(ctx))?;
            if let Put::Stored(etag) = put(ctx, &key, encode(&generated), Condition::Absent).await?
            {
                let detail = format!(
                    "generated the cluster PKI (CA {})",
                    &generated.ca_fingerprint()?[..16]
                );
                let shared = Shared {
                    bundle: generated,
                    etag,
                };
                (shared, detail, true)
            } else {
                // Another master won the race: use its PKI, drop ours.
                let shared = read(ctx, &key).await?;
                let detail = format!(
                    "lost the race to create the PKI; using the winner's (CA {})",
                    &shared.bundle.ca_fingerprint()?[..16]
                );
                (shared, detail, false)
            }
        }
    };
    let Maintained {
        bundle,
        renewed,
        rotated,
        completed,
    } = maintain(ctx, &key, &id, shared).await?;
    if completed {
        detail.push_str("; brought up to date (the Secrets key, admin.conf's server)");
    }
    if !renewed.is_empty() {
        let list: Vec<String> = renewed
            .iter()
            .map(|d| format!("{} ({})", d.file, d.why))
            .collect();
        detail.push_str(&format!(
            "; renewed {} certificates: {}",
            renewed.len(),
            list.join(", ")
        ));
    }
    if let Some(old) = &rotated {
        detail.push_str(&format!(
            "; replaced bootstrap token {old} with {} (expires {})",
            pki::token_id(bundle.get("bootstrap-token")?),
            bundle.token_expires.as_deref().unwrap_or("never")
        ));
    }
    for warning in bundle.ca_warnings(time::OffsetDateTime::now_utc())? {
        tracing::warn!(step = STEP, "{warning}");
    }
    // Node bundle and admin kubeconfig derive from the one PKI; writing them
    // again is harmless and heals a crash between the puts.
    put(
        ctx,
        &node_key(cluster),
        encode(&bundle.node_bundle()?),
        Condition::Always,
    )
    .await?;
    put(
        ctx,
        &admin_key(cluster),
        bundle.get("admin.conf")?.as_bytes().to_vec(),
        Condition::Always,
    )
    .await?;
    bundle.write(&ctx.paths.secrets.join("pki"))?;
    let report = if generated || completed || !renewed.is_empty() || rotated.is_some() {
        Report::changed(STEP, detail)
    } else {
        Report::already(STEP, detail)
    };
    Ok(Outcome {
        report,
        bundle,
        renewed,
        rotated,
    })
}

/// Lifetimes from now, the token's from the stack config.
fn validity(ctx: &Master<'_>) -> Validity {
    Validity {
        token: time::Duration::hours(i64::from(ctx.settings.token_hours)),
        ..Validity::now()
    }
}

/// The cluster's bundle as the bucket holds it, if it exists (masters only).
pub async fn shared(ctx: &Context) -> Result<Option<Bundle>, StepError> {
    let key = pki_key(&ctx.config.cluster_name);
    match get(ctx, &key).await? {
        Some(object) => Ok(Some(parse(&key, &object.body)?)),
        None => Ok(None),
    }
}

/// The bundle as the bucket holds it now.
async fn read(ctx: &Context, key: &str) -> Result<Shared, StepError> {
    let object = get(ctx, key).await?.ok_or_else(|| StepError::Invalid {
        what: key.to_owned(),
        message: "written a moment ago but missing now".into(),
    })?;
    Ok(Shared {
        bundle: parse(key, &object.body)?,
        etag: object.etag,
    })
}

/// The shared bundle after [`maintain`].
struct Maintained {
    bundle: Bundle,
    renewed: Vec<Due>,
    rotated: Option<String>,
    /// What an older release's bundle lacked was added, or admin.conf
    /// pointed at the Elastic IP.
    completed: bool,
}

/// Renews the shared bundle's due leaves (see [`Bundle::renew`]),
/// replaces its token at half its life (see [`Bundle::rotate_token`]) and
/// adds what an older release's bundle lacks ([`Bundle::completed`]), in
/// one write conditional on the version read: of two masters doing so at
/// once, the one that loses reads the winner's bundle, in which nothing is
/// due any more, and uses it.
async fn maintain(
    ctx: &Master<'_>,
    key: &str,
    id: &Identity,
    mut shared: Shared,
) -> Result<Maintained, StepError> {
    let window = super::configure::renew_window(ctx.settings);
    for _ in 0..RENEWAL_RACES {
        let validity = validity(ctx);
        let renewal = shared.bundle.renew(id, &validity, window)?;
        let (mut bundle, renewed) = match renewal {
            Some(r) => (r.bundle, r.renewed),
            None => (shared.bundle.clone(), Vec::new()),
        };
        let mut rotated = None;
        if let Some(r) = bundle.rotate_token(validity.now, validity.token)? {
            rotated = Some(r.old_id);
            bundle = r.bundle;
        }
        // A bundle of an older release gains what it lacks (the Secrets
        // encryption key, admin.conf on the Elastic IP) in the same write.
        let completed = bundle.completed(id)?;
        if let Some(b) = &completed {
            tracing::info!(
                step = STEP,
                "bringing {key} up to date (the Secrets key, admin.conf's server)"
            );
            bundle = b.clone();
        }
        if !renewed.is_empty() || rotated.is_some() || completed.is_some() {
            let etag = shared.etag.as_deref().ok_or_else(|| StepError::Invalid {
                what: key.to_owned(),
                message: "the bucket gave no ETag to make the renewal conditional on".into(),
            })?;
            if let Put::Lost = put(ctx, key, encode(&bundle), Condition::Unchanged(etag)).await? {
                tracing::info!(
                    step = STEP,
                    "another master wrote {key} first; reading its version"
                );
                shared = read(ctx, key).await?;
                continue;
            }
        }
        return Ok(Maintained {
            bundle,
            renewed,
            rotated,
            completed: completed.is_some(),
        });
    }
    Err(StepError::Wait(format!(
        "renewing {key}: other writers changed it {RENEWAL_RACES} times in a row"
    )))
}

/// Node: wait until the bucket holds the node bundle with a bootstrap
/// token that has not expired (a master that was down past its token's
/// end puts a new one in place when it returns), then fetch it.
pub async fn node(ctx: &Context, deadline: Duration) -> Result<(Report, Bundle), StepError> {
    let key = node_key(&ctx.config.cluster_name);
    let what = format!(
        "waiting for s3://{}/{key} with a bootstrap token that has not expired",
        ctx.config.secrets_bucket
    );
    let stale = std::sync::atomic::AtomicBool::new(false);
    let bundle = retry::until(&what, Backoff::new(deadline), || async {
        let Some(object) = get(ctx, &key).await? else {
            return Ok::<_, StepError>(None);
        };
        let bundle = parse(&key, &object.body)?;
        if bundle.token_expired(time::OffsetDateTime::now_utc())? {
            if !stale.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    step = STEP,
                    "the bootstrap token in {key} expired at {}; waiting for the master to replace it",
                    bundle.token_expires.as_deref().unwrap_or("?")
                );
            }
            return Ok(None);
        }
        Ok(Some(bundle))
    })
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    bundle.write(&ctx.paths.secrets.join("pki"))?;
    let detail = format!(
        "fetched the node bundle (CA {}, token expires {})",
        &bundle.ca_fingerprint()?[..16],
        bundle.token_expires.as_deref().unwrap_or("never")
    );
    Ok((Report::changed(STEP, detail), bundle))
}
