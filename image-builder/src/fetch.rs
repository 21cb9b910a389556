//! The one downloader: HTTP(S) and `file://` sources into the cache's
//! content-addressed store (`blobs/sha256/<hex>`). Bytes are hashed while
//! they stream to a temporary file and admitted by an atomic rename only
//! when the sha256 matches, so a killed or corrupted download never leaves
//! anything that looks valid, and a cached blob is never fetched twice.

use crate::cache::Cache;
use crate::fsio::{self, PathError};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{what}: {url}: {message}")]
    Source {
        what: String,
        url: String,
        message: String,
    },
    #[error("{what}: {url} has sha256 {actual}, expected {expected}")]
    Digest {
        what: String,
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: {expected:?} is not a sha256 (64 lowercase hex digits)")]
    BadDigest { what: String, expected: String },
    #[error(transparent)]
    Io(#[from] PathError),
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where the blob with this sha256 lives in the cache (it may not exist).
pub fn blob_path(cache: &Cache, sha256: &str) -> PathBuf {
    cache.entry("blobs/sha256", sha256)
}

/// An HTTP agent with sane timeouts, shared by the artifact and OCI code.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(15))
        .timeout_read(Duration::from_secs(120))
        .redirects(5)
        .build()
}

/// Opens `url` (http, https or file) for reading.
pub fn open(
    agent: &ureq::Agent,
    what: &str,
    url: &str,
) -> Result<Box<dyn Read + Send>, FetchError> {
    let source = |message: String| FetchError::Source {
        what: what.to_owned(),
        url: url.to_owned(),
        message,
    };
    if let Some(path) = url.strip_prefix("file://") {
        let f = fs::File::open(path).map_err(|e| source(e.to_string()))?;
        return Ok(Box::new(f));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(source(
            "only http://, https:// and file:// sources are supported".into(),
        ));
    }
    match agent.get(url).call() {
        Ok(resp) => Ok(Box::new(resp.into_reader())),
        Err(ureq::Error::Status(code, _)) => Err(source(format!("HTTP {code}"))),
        Err(e) => Err(source(e.to_string())),
    }
}

/// Streams `reader` into the cache, admitting it only if its sha256 is
/// `expected`. `what` and `url` name it in errors.
pub fn admit(
    cache: &Cache,
    mut reader: impl Read,
    expected: &str,
    what: &str,
    url: &str,
) -> Result<PathBuf, FetchError> {
    let dest = blob_path(cache, expected);
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(fsio::at("creating", dir))?;
    let tmp = unique_temp(&dest);
    let result = (|| {
        let mut out = fs::File::create(&tmp).map_err(fsio::at("creating", &tmp))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| FetchError::Source {
                what: what.to_owned(),
                url: url.to_owned(),
                message: format!("reading: {e}"),
            })?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(fsio::at("writing", &tmp))?;
        }
        out.sync_all().map_err(fsio::at("syncing", &tmp))?;
        let actual = hex::encode(hash.finalize());
        if actual != expected {
            return Err(FetchError::Digest {
                what: what.to_owned(),
                url: url.to_owned(),
                expected: expected.to_owned(),
                actual,
            });
        }
        fs::rename(&tmp, &dest).map_err(fsio::at("renaming", &dest))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| dest)
}

/// The blob with sha256 `expected`, downloaded from `url` unless cached.
pub fn fetch(
    cache: &Cache,
    agent: &ureq::Agent,
    what: &str,
    url: &str,
    expected: &str,
) -> Result<PathBuf, FetchError> {
    if !is_sha256(expected) {
        return Err(FetchError::BadDigest {
            what: what.to_owned(),
            expected: expected.to_owned(),
        });
    }
    let dest = blob_path(cache, expected);
    if dest.exists() {
        return Ok(dest);
    }
    let reader = open(agent, what, url)?;
    admit(cache, reader, expected, what, url)
}

fn unique_temp(dest: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn a_file_source_is_admitted_once_its_digest_matches() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().join("cache"));
        let src = dir.path().join("kubelet");
        fs::write(&src, b"kubelet bytes").unwrap();
        let url = format!("file://{}", src.display());
        let got = fetch(&cache, &agent(), "kubelet v1", &url, &sha(b"kubelet bytes")).unwrap();
        assert_eq!(fs::read(&got).unwrap(), b"kubelet bytes");
        // Cached: the source may go away.
        fs::remove_file(&src).unwrap();
        assert_eq!(
            fetch(&cache, &agent(), "kubelet v1", &url, &sha(b"kubelet bytes")).unwrap(),
            got
        );
    }

    #[test]
    fn a_wrong_digest_is_refused_by_name_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().join("cache"));
        let src = dir.path().join("etcd");
        fs::write(&src, b"not what was pinned").unwrap();
        let url = format!("file://{}", src.display());
        let expected = sha(b"what was pinned");
        let err = fetch(&cache, &agent(), "etcd v3.6.16", &url, &expected).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("etcd v3.6.16: file://"), "{msg}");
        assert!(
            msg.contains(&expected) && msg.contains(&sha(b"not what was pinned")),
            "{msg}"
        );
        let left: Vec<_> = walkdir::WalkDir::new(cache.root())
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_owned());
        let err = fetch(&cache, &agent(), "crictl", "file:///x", "abc").unwrap_err();
        assert!(
            err.to_string().contains("crictl: \"abc\" is not a sha256"),
            "{err}"
        );
        let err = fetch(&cache, &agent(), "crictl", "ftp://x/y", &sha(b"")).unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
        let err = fetch(
            &cache,
            &agent(),
            "crictl",
            "file:///nonexistent/crictl",
            &sha(b""),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("crictl: file:///nonexistent/crictl"),
            "{err}"
        );
    }
}
