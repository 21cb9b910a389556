//! Debian packages: which mirror to use (this machine's apt configuration
//! unless told otherwise), fetching pinned `.deb`s into the cache's content
//! store with their sha256 checked (through the one downloader, `fetch`),
//! and a flat local repository that holds exactly the locked packages, so a
//! build never sees a version the lock does not name.

use crate::cache::Cache;
use crate::fetch::{self, FetchError};
use crate::fsio;
use crate::lockfile::{Lock, LockedPackage};
use crate::tools::{self, ToolError};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error("no Debian mirror configured: pass --mirror, set SLIPWAY_DEBIAN_MIRROR or debian.mirror in the spec, or configure one for apt in /etc/apt/sources.list(.d)")]
    NoMirror,
    #[error(transparent)]
    Fetch(FetchError),
    #[error("{package} {version}: expected sha256 {expected}, got {actual} (from {source_desc}); the lock and the mirror disagree, run `image-builder lock` to re-resolve")]
    Digest {
        package: String,
        version: String,
        expected: String,
        actual: String,
        source_desc: String,
    },
    #[error(transparent)]
    Io(#[from] crate::fsio::PathError),
    #[error(transparent)]
    Tool(#[from] ToolError),
}

/// The first Debian archive URI in apt's configuration under `etc_apt`
/// (deb822 `.sources` first, then one-line `.list` files), skipping the
/// security archive, which only carries updates.
pub fn host_mirror(etc_apt: &Path) -> Option<String> {
    let mut files: Vec<PathBuf> = fs::read_dir(etc_apt.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list"))
        .collect();
    files.sort();
    files.push(etc_apt.join("sources.list"));
    let usable = |uri: &str| {
        (uri.starts_with("http://") || uri.starts_with("https://") || uri.starts_with("file:/"))
            && uri.trim_end_matches('/').ends_with("/debian")
    };
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let deb822 = file.extension().is_some_and(|e| e == "sources");
        for line in text.lines().map(str::trim) {
            let candidate = if deb822 {
                line.strip_prefix("URIs:")
                    .map(|v| v.split_whitespace().next().unwrap_or(""))
            } else if line.starts_with("deb ") {
                line.split_whitespace()
                    .skip(1)
                    .find(|w| !w.starts_with('['))
            } else {
                None
            };
            if let Some(uri) = candidate.filter(|u| usable(u)) {
                return Some(uri.trim_end_matches('/').to_owned());
            }
        }
    }
    None
}

/// Picks the mirror: explicit setting, environment, spec, then the host's apt.
pub fn resolve_mirror(cli: Option<&str>, spec: Option<&str>) -> Result<String, DebianError> {
    cli.map(str::to_owned)
        .or_else(|| {
            std::env::var("SLIPWAY_DEBIAN_MIRROR")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or_else(|| spec.map(str::to_owned))
        .or_else(|| host_mirror(Path::new("/etc/apt")))
        .map(|m| m.trim_end_matches('/').to_owned())
        .ok_or(DebianError::NoMirror)
}

/// Where a package lives in the cache: the content store, by its sha256.
pub fn cached_deb(cache: &Cache, pkg: &LockedPackage) -> PathBuf {
    fetch::blob_path(cache, &pkg.sha256)
}

/// A download's digest mismatch said as the lock's disagreement it is.
fn disagreement(pkg: &LockedPackage, e: FetchError) -> DebianError {
    match e {
        FetchError::Digest {
            url,
            expected,
            actual,
            ..
        } => DebianError::Digest {
            package: pkg.name.clone(),
            version: pkg.version.clone(),
            expected,
            actual,
            source_desc: url,
        },
        other => DebianError::Fetch(other),
    }
}

/// Puts `src` into the cache, checking its digest against the lock.
pub fn adopt(cache: &Cache, pkg: &LockedPackage, src: &Path) -> Result<PathBuf, DebianError> {
    let file = fs::File::open(src).map_err(fsio::at("reading", src))?;
    let what = format!("{} {}", pkg.name, pkg.version);
    fetch::admit(cache, file, &pkg.sha256, &what, &src.display().to_string())
        .map_err(|e| disagreement(pkg, e))
}

/// Every package the lock pins: the image's, then the build's tools.
pub fn locked(lock: &Lock) -> impl Iterator<Item = &LockedPackage> {
    lock.packages.iter().chain(&lock.tools)
}

/// Downloads every locked package (the build's tools included) missing
/// from the cache, checking each sha256 before it is admitted. Returns how
/// many were fetched.
pub fn fetch_missing(
    cache: &Cache,
    lock: &Lock,
    mirror: &str,
    progress: impl Fn(&str),
) -> Result<usize, DebianError> {
    let missing: Vec<&LockedPackage> = locked(lock)
        .filter(|p| !cached_deb(cache, p).exists())
        .collect();
    let agent = fetch::agent();
    for (i, pkg) in missing.iter().enumerate() {
        progress(&format!(
            "fetching {}/{} {} {}",
            i + 1,
            missing.len(),
            pkg.name,
            pkg.version
        ));
        let what = format!("{} {}", pkg.name, pkg.version);
        let url = format!("{mirror}/{}", pkg.path);
        fetch::fetch(cache, &agent, &what, &url, &pkg.sha256).map_err(|e| disagreement(pkg, e))?;
    }
    Ok(missing.len())
}

/// Builds (once per lock) a flat apt repository holding exactly the locked
/// packages: hard links into the deb cache plus a `Packages` index.
pub fn local_repo(cache: &Cache, lock: &Lock) -> Result<PathBuf, DebianError> {
    let dir = cache.entry("repo", &lock.digest());
    if dir.join("Packages").exists() {
        return Ok(dir);
    }
    let tmp = Cache::temp_for(&dir);
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(fsio::at("creating", &tmp))?;
    let mut index = String::new();
    for pkg in &lock.packages {
        let file = pkg.path.rsplit('/').next().unwrap_or(&pkg.path).to_owned();
        let src = cached_deb(cache, pkg);
        let dest = tmp.join(&file);
        fs::hard_link(&src, &dest)
            .or_else(|_| fs::copy(&src, &dest).map(drop))
            .map_err(fsio::at("linking", &src))?;
        let control = tools::run(tools::command(tools::DPKG_DEB)?.arg("--field").arg(&src))?;
        index.push_str(control.trim_end());
        index.push_str(&format!(
            "\nFilename: ./{file}\nSize: {}\nSHA256: {}\n\n",
            pkg.size, pkg.sha256
        ));
    }
    let packages = tmp.join("Packages");
    fs::write(&packages, index).map_err(fsio::at("writing", &packages))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).map_err(fsio::at("renaming", &dir))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_comes_from_deb822_sources() {
        let etc = tempfile::tempdir().unwrap();
        fs::create_dir(etc.path().join("sources.list.d")).unwrap();
        fs::write(
            etc.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: x\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(etc.path()).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn mirror_comes_from_one_line_lists() {
        let etc = tempfile::tempdir().unwrap();
        fs::write(
            etc.path().join("sources.list"),
            "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(etc.path()).as_deref(),
            Some("http://m.example/debian")
        );
    }

    #[test]
    fn no_configuration_gives_no_mirror() {
        let etc = tempfile::tempdir().unwrap();
        assert_eq!(host_mirror(etc.path()), None);
    }

    #[test]
    fn a_package_with_the_wrong_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().join("cache"));
        let deb = dir.path().join("x.deb");
        fs::write(&deb, b"not the locked bytes").unwrap();
        let pkg = LockedPackage {
            name: "x".into(),
            version: "1".into(),
            arch: "amd64".into(),
            path: "pool/main/x/x/x_1_amd64.deb".into(),
            sha256: "00".repeat(32),
            size: 20,
        };
        let err = adopt(&cache, &pkg, &deb).unwrap_err().to_string();
        assert!(
            err.contains("expected sha256 0000") && err.contains("x 1"),
            "{err}"
        );
        assert!(!cached_deb(&cache, &pkg).exists());
    }
}
