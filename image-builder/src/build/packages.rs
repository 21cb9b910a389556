//! The packages stage: every .deb the lock names (the image's and the
//! build's tools), in the cache by its sha256 (fetched from the mirror only
//! when missing, and checked against the lock).

use super::BuildError;
use crate::cache::Cache;
use crate::debian;
use crate::lockfile::Lock;
use crate::progress::{Outcome, Progress};

/// Fetches the locked packages the cache lacks; `mirror` is asked for only
/// when one is missing.
pub fn fetch(
    cache: &Cache,
    lock: &Lock,
    mirror: impl FnOnce() -> Result<String, BuildError>,
    progress: &Progress,
) -> Result<(), BuildError> {
    progress.stage("packages", || {
        let total = debian::locked(lock).count();
        let missing = debian::locked(lock)
            .filter(|p| !debian::cached_deb(cache, p).exists())
            .count();
        if missing == 0 {
            return Ok(((), Outcome::cached(format!("{total} packages"))));
        }
        let n = debian::fetch_missing(cache, lock, &mirror()?, |m| progress.note(m))?;
        Ok(((), Outcome::built(format!("fetched {n} of {total}"))))
    })
}
