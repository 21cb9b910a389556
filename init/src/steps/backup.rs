//! etcd backups in the secrets bucket. A timer on the master runs
//! `slipway-init backup` every few minutes; it takes a snapshot when the
//! newest one is `master_backup_minutes` old. etcd writes the snapshot
//! itself (etcdctl inside its own container, so the snapshot is consistent
//! and no etcd client ships on the host) to the data volume, next to its
//! data; the file goes to `<cluster>/etcd-backups/` under a name that holds
//! when it was taken and etcd's revision, with its sha256 in the object's
//! metadata; the bucket's default encryption (its KMS key) applies, as to
//! every object of the cluster. Then the backups past the retention are
//! deleted: the newest `master_backups_kept`, and the newest of each UTC
//! day for `master_backup_days`, stay.
//!
//! A backup is read back only through [`fetch`], which refuses one whose
//! bytes do not hash to the sha256 stored with it.

use super::renewal::{crictl, running};
use super::{aws_err, Context, Master, Report, StepError};
use crate::config::Backups;
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

pub const STEP: &str = "backup";
/// The AWS actions a master's backups call.
pub const CALLS: &[&str] = &[
    "s3:ListBucket",
    "s3:PutObject",
    "s3:GetObject",
    "s3:DeleteObject",
];

/// The snapshot's file on the data volume while it is uploaded. etcd's
/// container mounts the volume at the same path as the host.
pub const SNAPSHOT_FILE: &str = "slipway-backup.db";
/// Where etcd's container sees the data volume (its static pod's mount).
const ETCD_DATA_IN_CONTAINER: &str = "/var/lib/etcd";
/// How long etcd gets to write a snapshot.
const SNAPSHOT_SECONDS: &str = "600";
/// How long etcdctl gets to connect, and a request (not the snapshot,
/// which etcdctl bounds only when the flag is given) to be answered. Its
/// defaults (2 s, 5 s) are shorter than a TLS handshake takes on a master
/// busy starting its add-ons under emulation, where a backup failed for
/// want of them.
const DIAL_TIMEOUT: &str = "--dial-timeout=30s";
const REQUEST_TIMEOUT: &str = "--command-timeout=120s";
/// The object metadata that holds a backup's sha256 (hex).
const SHA256_META: &str = "sha256";
/// The object metadata that holds etcd's revision when it was taken.
const REVISION_META: &str = "revision";

/// The key prefix of the cluster's backups.
pub fn prefix(cluster: &str) -> String {
    format!("{cluster}/etcd-backups/")
}

/// One backup in the bucket, as its key tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub key: String,
    pub taken: OffsetDateTime,
    pub revision: u64,
    pub size: i64,
}

/// `20261202T091500Z`: sorts as time does.
pub(crate) fn stamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn parse_stamp(s: &str) -> Option<OffsetDateTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let date = Date::from_calendar_date(
        i32::try_from(n(0..4)?).ok()?,
        Month::try_from(u8::try_from(n(4..6)?).ok()?).ok()?,
        u8::try_from(n(6..8)?).ok()?,
    )
    .ok()?;
    let time = Time::from_hms(
        u8::try_from(n(9..11)?).ok()?,
        u8::try_from(n(11..13)?).ok()?,
        u8::try_from(n(13..15)?).ok()?,
    )
    .ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

/// The key of a backup taken at `taken` at `revision`.
pub fn key(cluster: &str, taken: OffsetDateTime, revision: u64) -> String {
    format!("{}{}-r{revision}.db", prefix(cluster), stamp(taken))
}

impl Backup {
    /// A backup from its key and size; `None` for anything else under the
    /// prefix (never deleted, never restored).
    pub fn from_key(cluster: &str, key: &str, size: i64) -> Option<Self> {
        let name = key.strip_prefix(&prefix(cluster))?.strip_suffix(".db")?;
        let (when, revision) = name.split_once("-r")?;
        Some(Self {
            key: key.to_owned(),
            taken: parse_stamp(when)?,
            revision: revision.parse().ok()?,
            size,
        })
    }
}

/// Which of `backups` the retention lets go: all but the newest
/// `keep_last`, and the newest of each UTC day of the last `daily_days`
/// (today included). The newest backup always stays.
pub fn expired(backups: &[Backup], now: OffsetDateTime, policy: &Backups) -> Vec<Backup> {
    let mut newest_first = backups.to_vec();
    newest_first.sort_by(|a, b| b.taken.cmp(&a.taken).then(b.revision.cmp(&a.revision)));
    let oldest_daily = now.date() - time::Duration::days(i64::from(policy.daily_days));
    let keep_last = usize::try_from(policy.keep_last.max(1)).unwrap_or(usize::MAX);
    let mut days_kept: Vec<Date> = Vec::new();
    let mut gone = Vec::new();
    for (i, b) in newest_first.into_iter().enumerate() {
        let day = b.taken.date();
        let daily = policy.daily_days > 0 && day > oldest_daily && !days_kept.contains(&day);
        if daily {
            days_kept.push(day);
        }
        if i >= keep_last && !daily {
            gone.push(b);
        }
    }
    gone
}

/// Whether a backup is due: none yet, or the newest is `every_minutes`
/// old (a minute's slack, so a timer firing on the minute does not skip
/// one). Never on schedule when `every_minutes` is 0.
pub fn due(newest: Option<&Backup>, now: OffsetDateTime, policy: &Backups) -> bool {
    if policy.every_minutes == 0 {
        return false;
    }
    match newest {
        None => true,
        Some(b) => now - b.taken >= time::Duration::minutes(i64::from(policy.every_minutes) - 1),
    }
}

/// Every backup of the cluster, oldest first.
pub async fn list(ctx: &Context) -> Result<Vec<Backup>, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    let cluster = &ctx.config.cluster_name;
    let mut backups = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = ctx
            .aws
            .s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix(cluster))
            .set_continuation_token(token.take())
            .send()
            .await
            .map_err(aws_err(
                "s3:ListBucket",
                format!("listing s3://{bucket}/{}", prefix(cluster)),
            ))?;
        for object in page.contents() {
            let key = object.key().unwrap_or_default();
            if let Some(b) = Backup::from_key(cluster, key, object.size().unwrap_or(0)) {
                backups.push(b);
            }
        }
        match page.next_continuation_token() {
            Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
            _ => break,
        }
    }
    backups.sort_by(|a, b| a.taken.cmp(&b.taken).then(a.revision.cmp(&b.revision)));
    Ok(backups)
}

/// Runs etcdctl inside etcd's running container, as the etcd CA's
/// health-check client (etcd checks only that a client's certificate is
/// the CA's), and returns its output.
fn etcdctl(ctx: &Context, args: &[&str]) -> Result<String, StepError> {
    let id = running(ctx, "etcd")?
        .into_iter()
        .next()
        .ok_or_else(|| StepError::Wait("etcd is not running on this master".into()))?;
    let pki = ctx.paths.secrets.join("pki/etcd");
    let file = |name: &str| pki.join(name).to_string_lossy().into_owned();
    let (ca, cert, key) = (
        format!("--cacert={}", file("ca.crt")),
        format!("--cert={}", file("healthcheck-client.crt")),
        format!("--key={}", file("healthcheck-client.key")),
    );
    let timeout = format!("--timeout={SNAPSHOT_SECONDS}");
    let mut all = vec![
        "exec",
        "--sync",
        &timeout,
        &id,
        "etcdctl",
        "--endpoints=https://127.0.0.1:2379",
        &ca,
        &cert,
        &key,
    ];
    all.push(DIAL_TIMEOUT);
    all.extend_from_slice(args);
    crictl(ctx, &all)
}

/// etcd's current revision, from `endpoint status`.
fn revision(ctx: &Context) -> Result<u64, StepError> {
    let out = etcdctl(
        ctx,
        &[REQUEST_TIMEOUT, "endpoint", "status", "--write-out=json"],
    )?;
    let invalid = |message: String| StepError::Invalid {
        what: "etcd's endpoint status".into(),
        message,
    };
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with('['))
        .ok_or_else(|| invalid(format!("no JSON in {out:?}")))?;
    let status: serde_json::Value =
        serde_json::from_str(line).map_err(|e| invalid(e.to_string()))?;
    status[0]["Status"]["header"]["revision"]
        .as_u64()
        .ok_or_else(|| invalid(format!("no revision in {line}")))
}

/// The sha256 (hex) and length of a file, read in pieces.
fn digest_file(path: &Path) -> Result<(String, u64), StepError> {
    let io = |e: std::io::Error| StepError::Invalid {
        what: path.display().to_string(),
        message: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// Takes a snapshot now and uploads it; returns what it stored.
async fn take(ctx: &Context, now: OffsetDateTime) -> Result<(Backup, String), StepError> {
    let bucket = &ctx.config.secrets_bucket;
    let local = ctx.paths.etcd_data.join(SNAPSHOT_FILE);
    // What a run that died left behind (etcdctl writes `.part` first).
    for stale in [local.clone(), local.with_extension("db.part")] {
        let _ = std::fs::remove_file(stale);
    }
    let revision = revision(ctx)?;
    let in_container = format!("{ETCD_DATA_IN_CONTAINER}/{SNAPSHOT_FILE}");
    etcdctl(ctx, &["snapshot", "save", &in_container])?;
    let (sha256, len) = digest_file(&local)?;
    let key = key(&ctx.config.cluster_name, now, revision);
    let body = ByteStream::from_path(&local)
        .await
        .map_err(|e| StepError::Invalid {
            what: local.display().to_string(),
            message: e.to_string(),
        })?;
    let put = ctx
        .aws
        .s3
        .put_object()
        .bucket(bucket)
        .key(&key)
        .metadata(SHA256_META, &sha256)
        .metadata(REVISION_META, revision.to_string())
        .if_none_match("*")
        .body(body)
        .send()
        .await;
    let _ = std::fs::remove_file(&local);
    put.map_err(aws_err(
        "s3:PutObject",
        format!("uploading s3://{bucket}/{key}"),
    ))?;
    let backup = Backup {
        key,
        taken: now,
        revision,
        size: i64::try_from(len).unwrap_or(i64::MAX),
    };
    Ok((backup, sha256))
}

/// Deletes the backups the retention lets go; returns how many.
async fn prune(
    ctx: &Context,
    backups: &[Backup],
    now: OffsetDateTime,
    policy: &Backups,
) -> Result<usize, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    let gone = expired(backups, now, policy);
    for b in &gone {
        ctx.aws
            .s3
            .delete_object()
            .bucket(bucket)
            .key(&b.key)
            .send()
            .await
            .map_err(aws_err(
                "s3:DeleteObject",
                format!("deleting the expired backup s3://{bucket}/{}", b.key),
            ))?;
    }
    Ok(gone.len())
}

/// Takes a backup when one is due (or at once with `now`), then applies
/// the retention.
pub async fn run(ctx: &Master<'_>, at: OffsetDateTime, force: bool) -> Result<Report, StepError> {
    let policy = ctx.settings.backups;
    let mut backups = list(ctx).await?;
    if !force && !due(backups.last(), at, &policy) {
        let detail = match backups.last() {
            None => "backups are off (master_backup_minutes = 0)".to_owned(),
            Some(b) if policy.every_minutes == 0 => {
                format!("backups are off; the newest is {}", b.key)
            }
            Some(b) => format!(
                "the newest backup is {} min old (one every {} min)",
                (at - b.taken).whole_minutes(),
                policy.every_minutes
            ),
        };
        return Ok(Report::already(STEP, detail));
    }
    let started = std::time::Instant::now();
    let (backup, sha256) = take(ctx, at).await?;
    backups.push(backup.clone());
    let pruned = prune(ctx, &backups, at, &policy).await?;
    Ok(Report::changed(
        STEP,
        format!(
            "etcd at revision {} to s3://{}/{} ({} bytes, sha256 {sha256}) in {}s; {pruned} past retention deleted",
            backup.revision,
            ctx.config.secrets_bucket,
            backup.key,
            backup.size,
            started.elapsed().as_secs()
        ),
    ))
}

/// Downloads backup `key` to `dest` and checks it against the sha256
/// stored with it; a backup that does not match is refused and nothing
/// is left at `dest`.
pub async fn fetch(ctx: &Context, key: &str, dest: &Path) -> Result<Backup, StepError> {
    let bucket = &ctx.config.secrets_bucket;
    let cluster = &ctx.config.cluster_name;
    let invalid = |message: String| StepError::Invalid {
        what: format!("the backup s3://{bucket}/{key}"),
        message,
    };
    let named = Backup::from_key(cluster, key, 0)
        .ok_or_else(|| invalid(format!("not a backup of cluster {cluster}")))?;
    let out = ctx
        .aws
        .s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(aws_err(
            "s3:GetObject",
            format!("downloading s3://{bucket}/{key}"),
        ))?;
    let expected = out
        .metadata()
        .and_then(|m| m.get(SHA256_META))
        .cloned()
        .ok_or_else(|| invalid("has no sha256 stored with it".into()))?;
    let body = out
        .body
        .collect()
        .await
        .map_err(|e| StepError::Aws {
            action: format!("reading s3://{bucket}/{key}"),
            api: "s3:GetObject",
            message: e.to_string(),
        })?
        .into_bytes();
    let actual = hex::encode(Sha256::digest(&body));
    if actual != expected {
        return Err(invalid(format!(
            "its bytes hash to sha256 {actual}, not the {expected} stored with it; refused"
        )));
    }
    let io = |e: std::io::Error| StepError::Invalid {
        what: dest.display().to_string(),
        message: e.to_string(),
    };
    let part = dest.with_extension("part");
    std::fs::write(&part, &body).map_err(io)?;
    std::fs::rename(&part, dest).map_err(io)?;
    Ok(Backup {
        size: i64::try_from(body.len()).unwrap_or(i64::MAX),
        ..named
    })
}

/// The backups as `slipway-init backup --list` prints them, oldest first.
pub fn table(backups: &[Backup]) -> String {
    let mut out = String::from("taken (UTC)       revision        bytes  key\n");
    for b in backups {
        out.push_str(&format!(
            "{}  {:>8}  {:>11}  {}\n",
            stamp(b.taken),
            b.revision,
            b.size,
            b.key
        ));
    }
    if backups.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        parse_stamp(s).unwrap()
    }

    fn backup(s: &str, revision: u64) -> Backup {
        Backup {
            key: key("demo", at(s), revision),
            taken: at(s),
            revision,
            size: 1,
        }
    }

    #[test]
    fn a_key_names_its_time_and_revision_and_reads_back() {
        let k = key("demo", at("20261202T091500Z"), 4242);
        assert_eq!(k, "demo/etcd-backups/20261202T091500Z-r4242.db");
        let b = Backup::from_key("demo", &k, 7).unwrap();
        assert_eq!(
            (b.taken, b.revision, b.size),
            (at("20261202T091500Z"), 4242, 7)
        );
        for other in [
            "demo/etcd-backups/notes.txt",
            "demo/etcd-backups/20261302T091500Z-r1.db",
            "demo/etcd-backups/20261202T091500Z-rx.db",
            "other/etcd-backups/20261202T091500Z-r1.db",
            "demo/pki.json",
        ] {
            assert_eq!(Backup::from_key("demo", other, 0), None, "{other}");
        }
    }

    #[test]
    fn the_newest_k_and_one_a_day_for_d_days_stay() {
        let policy = Backups {
            every_minutes: 15,
            keep_last: 2,
            daily_days: 3,
        };
        let backups = [
            backup("20261125T120000Z", 1), // older than 3 days: goes
            backup("20261130T080000Z", 2), // Nov 30's older one: goes
            backup("20261130T200000Z", 3), // Nov 30's newest: stays
            backup("20261201T230000Z", 4), // Dec 1's newest: stays
            backup("20261202T090000Z", 5), // today's older one: goes
            backup("20261202T091500Z", 6), // newest two: stay
            backup("20261202T093000Z", 7),
        ];
        let gone: Vec<u64> = expired(&backups, at("20261202T093100Z"), &policy)
            .iter()
            .map(|b| b.revision)
            .collect();
        assert_eq!(gone, [5, 2, 1]);
        // Nothing is kept by the day with no days, and the newest always.
        let none = Backups {
            keep_last: 1,
            daily_days: 0,
            ..policy
        };
        let gone = expired(&backups, at("20261202T093100Z"), &none);
        assert_eq!(gone.len(), 6);
        assert!(gone.iter().all(|b| b.revision != 7));
    }

    #[test]
    fn a_backup_is_due_when_the_newest_is_as_old_as_the_interval() {
        let policy = Backups::default();
        let newest = backup("20261202T090000Z", 1);
        assert!(due(None, at("20261202T090000Z"), &policy));
        assert!(!due(Some(&newest), at("20261202T091000Z"), &policy));
        // A timer that fires on the minute finds it 14 min 59 s old.
        assert!(due(Some(&newest), at("20261202T091459Z"), &policy));
        let off = Backups {
            every_minutes: 0,
            ..policy
        };
        assert!(!due(None, at("20261202T090000Z"), &off));
    }
}
