//! Bootstrap tokens that expire: each lasts a set time (`expiration` on
//! its Secret, so the API server's token cleaner removes it), and the
//! master puts the next one in place at half its life, so a node always
//! finds a token with hours left in `node.json`.

use super::{bootstrap_token, renew::timestamp, Bundle, PkiError};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// A bundle with a new token, and the token it replaced.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub bundle: Bundle,
    /// The replaced token's ID (`bootstrap-token-<id>` is its Secret).
    pub old_id: String,
}

/// The token's ID (the public half of `<id>.<secret>`).
pub fn token_id(token: &str) -> &str {
    token.split('.').next().unwrap_or_default()
}

impl Bundle {
    /// When the bootstrap token expires; `None` if it never does.
    pub fn token_expiry(&self) -> Result<Option<OffsetDateTime>, PkiError> {
        self.token_expires
            .as_deref()
            .map(|t| {
                OffsetDateTime::parse(t, &Rfc3339).map_err(|e| PkiError::Unreadable {
                    file: "token_expires".into(),
                    message: format!("{t:?}: {e}"),
                })
            })
            .transpose()
    }

    /// Whether the token has expired at `now` (one that never expires
    /// has not).
    pub fn token_expired(&self, now: OffsetDateTime) -> Result<bool, PkiError> {
        Ok(self.token_expiry()?.is_some_and(|t| t <= now))
    }

    /// The bundle with a new token lasting `lifetime` from `now`, when the
    /// current one never expires or has less than half of `lifetime` left.
    pub fn rotate_token(
        &self,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Option<Rotation>, PkiError> {
        if self.token_expiry()?.is_some_and(|t| t - now > lifetime / 2) {
            return Ok(None);
        }
        let old = self.get("bootstrap-token")?.to_owned();
        let new = bootstrap_token()?;
        let mut bundle = self.clone();
        let conf = self.get("bootstrap-kubelet.conf")?;
        let line = format!("token: {old}");
        if !conf.contains(&line) {
            return Err(PkiError::Unreadable {
                file: "bootstrap-kubelet.conf".into(),
                message: "it does not carry the bundle's token".into(),
            });
        }
        bundle.files.insert(
            "bootstrap-kubelet.conf".into(),
            conf.replacen(&line, &format!("token: {new}"), 1),
        );
        bundle.files.insert("bootstrap-token".into(), new);
        bundle.token_expires = Some(timestamp(now + lifetime));
        Ok(Some(Rotation {
            bundle,
            old_id: token_id(&old).to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::tests::identity;
    use crate::pki::Validity;

    fn bundle(issued: OffsetDateTime) -> Bundle {
        Bundle::generate_with(&identity(), &Validity::at(issued)).unwrap()
    }

    fn epoch() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    #[test]
    fn a_new_bundles_token_expires_after_its_lifetime() {
        let b = bundle(epoch());
        assert_eq!(b.token_expires.as_deref(), Some("2027-01-16T08:00:00Z"));
        assert_eq!(
            b.token_expiry().unwrap(),
            Some(epoch() + Duration::hours(24))
        );
        assert!(!b.token_expired(epoch()).unwrap());
        assert!(b.token_expired(epoch() + Duration::hours(24)).unwrap());
    }

    #[test]
    fn a_token_is_replaced_at_half_its_life() {
        let b = bundle(epoch());
        let day = Duration::hours(24);
        assert!(b
            .rotate_token(epoch() + Duration::hours(11), day)
            .unwrap()
            .is_none());
        let at = epoch() + Duration::hours(13);
        let r = b.rotate_token(at, day).unwrap().expect("rotated");
        let (old, new) = (
            b.get("bootstrap-token").unwrap(),
            r.bundle.get("bootstrap-token").unwrap(),
        );
        assert_ne!(old, new);
        assert_eq!(r.old_id, token_id(old));
        assert_eq!(b.token_expiry().unwrap(), Some(epoch() + day));
        assert_eq!(r.bundle.token_expiry().unwrap(), Some(at + day));
        let conf = r.bundle.get("bootstrap-kubelet.conf").unwrap();
        assert!(conf.contains(&format!("token: {new}")), "{conf}");
        assert!(!conf.contains(old));
        // Nothing else changed.
        for (k, v) in &b.files {
            if k != "bootstrap-token" && k != "bootstrap-kubelet.conf" {
                assert_eq!(r.bundle.files.get(k), Some(v), "{k}");
            }
        }
    }

    #[test]
    fn a_token_that_never_expired_is_replaced_at_once() {
        let mut b = bundle(epoch());
        b.token_expires = None;
        assert!(!b.token_expired(epoch() + Duration::days(900)).unwrap());
        let r = b
            .rotate_token(epoch(), Duration::hours(24))
            .unwrap()
            .unwrap();
        assert_eq!(r.old_id, token_id(b.get("bootstrap-token").unwrap()));
    }

    #[test]
    fn an_unreadable_expiry_is_named() {
        let mut b = bundle(epoch());
        b.token_expires = Some("tomorrow".into());
        let err = b.token_expiry().unwrap_err().to_string();
        assert!(
            err.contains("token_expires") && err.contains("tomorrow"),
            "{err}"
        );
    }
}
