//! The build cache: a directory of content-addressed entries (every
//! download by its sha256 in `blobs/sha256/`, stage outputs by the hash of
//! their inputs). Entries appear atomically: written under a temporary
//! name, then renamed.
//!
//! Stage outputs are keyed by everything that went into them, so every
//! change to the node binary or the spec leaves a new set behind. A build
//! marks the entries it uses and then keeps only the few most recently
//! used of each stage ([`Cache::prune`]); downloads are kept.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `--cache-dir`, else `$SLIPWAY_CACHE_DIR`, else `$XDG_CACHE_HOME/slipway`,
    /// else `~/.cache/slipway`.
    pub fn locate(explicit: Option<PathBuf>) -> Self {
        let root = explicit
            .or_else(|| std::env::var_os("SLIPWAY_CACHE_DIR").map(PathBuf::from))
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("slipway"))
            })
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/slipway")))
            .unwrap_or_else(|| PathBuf::from("/var/cache/slipway"));
        Self { root }
    }

    pub fn at(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of an entry (which may not exist yet) in `kind`.
    pub fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// Marks an entry as used now, for [`Cache::prune`].
    pub fn touch(entry: &Path) {
        // Best effort: an entry whose time cannot be set is only pruned sooner.
        let _ = filetime::set_file_mtime(entry, filetime::FileTime::now());
    }

    /// Removes all but the `keep` most recently used entries of `kind`, and
    /// returns the paths removed. Temporary entries (a build in progress)
    /// are left alone.
    pub fn prune(&self, kind: &str, keep: usize) -> io::Result<Vec<PathBuf>> {
        let dir = self.root.join(kind);
        let mut entries = Vec::new();
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        for entry in listing {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let used = entry.metadata()?.modified()?;
            entries.push((used, entry.path()));
        }
        entries.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
        let mut removed = Vec::new();
        for (_, path) in entries.into_iter().skip(keep) {
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            removed.push(path);
        }
        Ok(removed)
    }

    /// A fresh temporary path next to `dest`, for an atomic rename into it.
    pub fn temp_for(dest: &Path) -> PathBuf {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
    }
}

/// Hasher for cache keys: feed it every input of a stage.
#[derive(Debug, Default)]
pub struct Key(Sha256);

impl Key {
    pub fn new(stage: &str) -> Self {
        let mut k = Self(Sha256::new());
        k.str(stage);
        k
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }
    pub fn finish(&self) -> String {
        hex::encode(self.0.clone().finalize())
    }
}

/// sha256 of a file's contents, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_their_inputs() {
        let a = Key::new("s").str("ab").str("c").finish();
        let b = Key::new("s").str("a").str("bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, Key::new("s").str("ab").str("c").finish());
    }

    #[test]
    fn prune_keeps_the_most_recently_used_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_owned());
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            let entry = cache.entry("root", name);
            fs::create_dir_all(entry.join("sub")).unwrap();
            fs::write(entry.join("sub/f"), b"x").unwrap();
            let t = filetime::FileTime::from_unix_time(1_000_000 + i as i64, 0);
            filetime::set_file_mtime(&entry, t).unwrap();
        }
        // The oldest, used again, is kept; a build's temporary entry is not
        // counted or touched.
        Cache::touch(&cache.entry("root", "a"));
        fs::create_dir_all(cache.entry("root", ".e.tmp-1")).unwrap();

        let removed = cache.prune("root", 2).unwrap();

        let mut removed: Vec<_> = removed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(removed, ["b", "c"]);
        for kept in ["a", "d", ".e.tmp-1"] {
            assert!(cache.entry("root", kept).exists(), "{kept} was removed");
        }
        assert!(cache.prune("missing-kind", 2).unwrap().is_empty());
    }

    #[test]
    fn file_hash_matches_bytes_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"hello").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), sha256_bytes(b"hello"));
    }
}
