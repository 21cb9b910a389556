//! The Kubernetes payload: host binaries (the spec's `[[payload.artifact]]`,
//! pinned by sha256) and container images (`manifests/images.toml`, pinned
//! by digest), both pinned in `payload.lock`. They are fetched and pulled
//! at build time into the content-addressed cache, so the image starts a
//! cluster without reaching any registry. Mirrors redirect the downloads
//! (air-gapped sites, and the tests' fixtures); the pins do not change with
//! the source, so a mirror can never slip different bytes in.

use crate::cache::Cache;
use crate::fetch::{self, FetchError};
use crate::fsio::{self, PathError};
use crate::oci::{self, OciError, Reference};
use crate::spec::{Artifact, Payload};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use slipway_init::contract::{self, ListedImage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the images go in the image: per image an archive of its manifest
/// and config, and every layer once, unpacked under `layers/`, which
/// containerd's overlayfs snapshotter takes at boot as the layer's
/// snapshot instead of unpacking it.

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Io(#[from] PathError),
    #[error(
        "{what} has no pin in {lock}: run `image-builder lock` where the network reaches it, \
         or build against the fixtures (`just fixtures`)"
    )]
    Unpinned { what: String, lock: String },
}

/// `payload.lock`: what every artifact and image must hash to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    #[serde(default, rename = "artifact")]
    pub artifacts: Vec<LockedArtifact>,
    #[serde(default, rename = "image")]
    pub images: Vec<LockedImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockedArtifact {
    pub name: String,
    pub version: String,
    /// The architecture the download is for.
    pub arch: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockedImage {
    pub reference: String,
    /// What the reference resolves to: the multi-arch index upstream
    /// publishes (the build takes its linux/amd64 image, checking every
    /// step), or the linux/amd64 image manifest itself.
    pub digest: String,
}

/// A TOML file, with errors that name it.
fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, PayloadError> {
    let fail = |message: String| PayloadError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(fsio::at("reading", path))?;
    toml::from_str(&text).map_err(|e| fail(e.message().to_owned()))
}

impl Lock {
    pub fn load(path: &Path) -> Result<Self, PayloadError> {
        read_toml(path)
    }

    pub fn artifact(&self, name: &str, version: &str, arch: &str) -> Option<&LockedArtifact> {
        self.artifacts
            .iter()
            .find(|p| p.name == name && p.version == version && p.arch == arch)
    }

    pub fn image(&self, reference: &str) -> Option<&LockedImage> {
        self.images.iter().find(|p| p.reference == reference)
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!("# The payload's pins: every host binary by sha256, every container image by\n# the digest its tag resolves to (the multi-arch index, from which a build\n# takes its architecture's image). Written by the fixtures or by\n# `image-builder lock`; a build refuses bytes that do not match.\n\n{body}")
    }
}

/// The image list the manifests use (`manifests/images.toml`: name → reference).
pub fn load_images(path: &Path) -> Result<BTreeMap<String, String>, PayloadError> {
    read_toml(path)
}

/// Where to fetch from instead of upstream.
#[derive(Debug, Clone, Default)]
pub struct Mirrors {
    /// Prefix replacing an artifact URL's scheme and host (`file:///srv/mirror`).
    pub artifacts: Option<String>,
    /// Every registry redirected here (`http://127.0.0.1:5000`).
    pub registry: Option<String>,
}

impl Mirrors {
    pub fn artifact_url(&self, url: &str) -> String {
        match &self.artifacts {
            None => url.to_owned(),
            Some(m) => {
                let path = url
                    .split_once("://")
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .map_or("", |(_, p)| p);
                format!("{}/{path}", m.trim_end_matches('/'))
            }
        }
    }
}

impl Mirrors {
    /// An OCI client that pulls through the registry mirror, if any.
    pub fn client(&self) -> oci::Client {
        oci::Client::new(self.registry.clone().map(|base| oci::Mirror { base }))
    }
}

/// Where the payload's pins and bytes come from (`build` and `lock` flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Sources {
    /// The payload's pins (default: payload.lock next to the spec).
    #[arg(long, env = "SLIPWAY_PAYLOAD_LOCK")]
    pub payload_lock: Option<PathBuf>,
    /// Fetch payload artifacts from here instead of their upstream hosts
    /// (`file:///dir` or `http://host/prefix`; the upstream path is kept).
    #[arg(long, env = "SLIPWAY_ARTIFACT_MIRROR")]
    pub artifact_mirror: Option<String>,
    /// Pull every container image from this registry instead of its own
    /// (`http://127.0.0.1:5000`); images keep their names and pins.
    #[arg(long, env = "SLIPWAY_REGISTRY_MIRROR")]
    pub registry_mirror: Option<String>,
}

/// What a build and a lock refresh start from: the spec's image list, the
/// pins (none when the lock file does not exist yet) and the mirrors.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub images: BTreeMap<String, String>,
    pub lock_path: PathBuf,
    pub lock: Lock,
    pub mirrors: Mirrors,
}

impl Inputs {
    pub fn load(
        spec: &crate::spec::Spec,
        spec_dir: &Path,
        sources: &Sources,
    ) -> Result<Self, PayloadError> {
        let mirrors = Mirrors {
            artifacts: sources.artifact_mirror.clone(),
            registry: sources.registry_mirror.clone(),
        };
        let lock_path = sources.payload_lock.as_deref();
        let images = match &spec.payload.images {
            Some(p) => load_images(&spec_dir.join(p))?,
            None => BTreeMap::new(),
        };
        let lock_path = lock_path.map_or_else(|| spec_dir.join("payload.lock"), Path::to_path_buf);
        let lock = if lock_path.exists() {
            Lock::load(&lock_path)?
        } else {
            Lock::default()
        };
        Ok(Self {
            images,
            lock_path,
            lock,
            mirrors,
        })
    }
}

/// Each image reference once, in order.
pub fn unique_references(images: &BTreeMap<String, String>) -> Vec<&String> {
    let mut refs: Vec<&String> = images.values().collect();
    refs.sort();
    refs.dedup();
    refs
}

/// A file the payload puts into the image; keyed by `key`, read from `src`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PayloadFile {
    /// Relative to the image root.
    pub dest: PathBuf,
    /// In the cache.
    #[serde(skip)]
    pub src: PathBuf,
    pub mode: u32,
    /// What identifies the content (a sha256, or an archive's and a member's).
    pub key: String,
    /// `src` is an image's layer, to be unpacked as the directory `dest`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpacked: bool,
}

/// What the build manifest records about the payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub artifacts: Vec<RecordedArtifact>,
    pub images: Vec<RecordedImage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_files: Vec<RecordedImageFile>,
}

/// A host file taken out of one of the images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedImageFile {
    /// The image's reference.
    pub image: String,
    /// The layer it came from (the topmost that holds it).
    pub layer: String,
    /// Its path in the image.
    pub member: String,
    pub file_sha256: String,
    /// Where it is installed.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedArtifact {
    pub name: String,
    pub version: String,
    /// Of the download (the archive, for extracted members).
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Of the file installed (differs from `sha256` for an extracted member).
    pub file_sha256: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedImage {
    pub reference: String,
    /// The linux/amd64 image manifest's digest.
    pub digest: String,
    /// The multi-arch index it was resolved from, when pinned by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<String>,
    /// Manifest and config, as an OCI archive.
    pub archive: String,
    pub archive_sha256: String,
    /// The layers, each unpacked at `layers/<hex>` next to the archives.
    pub layers: Vec<RecordedLayer>,
}

/// A layer as the manifest and the image list record it.
pub use slipway_init::contract::ListedLayer as RecordedLayer;

/// A file name for an image's archive: its reference made path-safe.
pub fn archive_name(reference: &str) -> String {
    let safe: String = reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.tar")
}

/// Fetches every artifact and image (from the cache when there), checks
/// each against its pin, and returns the files to install (the files taken
/// out of images among them) and the record.
pub fn resolve(
    cache: &Cache,
    payload: &Payload,
    inputs: &Inputs,
    arch: &str,
    note: &dyn Fn(&str),
) -> Result<(Vec<PayloadFile>, Recorded), PayloadError> {
    let Inputs {
        images,
        lock_path,
        lock,
        mirrors,
    } = inputs;
    let unpinned = |what: String| PayloadError::Unpinned {
        what,
        lock: lock_path.display().to_string(),
    };
    let agent = fetch::agent();
    let images_dir = contract::in_tree(contract::IMAGES_DIR);
    let mut files = Vec::new();
    let mut record = Recorded::default();
    for a in &payload.artifacts {
        let what = format!("{} {} {arch}", a.name, a.version);
        let pin = lock
            .artifact(&a.name, &a.version, arch)
            .ok_or_else(|| unpinned(format!("artifact {what}")))?;
        let url = mirrors.artifact_url(&a.url_for(arch));
        if !fetch::blob_path(cache, &pin.sha256).exists() {
            note(&format!("fetching {what} from {url}"));
        }
        let mut src = fetch::fetch(cache, &agent, &what, &url, &pin.sha256)?;
        let mut key = pin.sha256.clone();
        let mut file_sha256 = pin.sha256.clone();
        if let Some(member) = &a.extract {
            (src, file_sha256) = extract(cache, &src, &pin.sha256, member, &what)?;
            key = format!("{}:{member}", pin.sha256);
        }
        let dest = a.install.strip_prefix("/").unwrap_or(&a.install).to_owned();
        record.artifacts.push(RecordedArtifact {
            name: a.name.clone(),
            version: a.version.clone(),
            sha256: pin.sha256.clone(),
            member: a.extract.clone(),
            file_sha256,
            path: a.install.display().to_string(),
        });
        files.push(PayloadFile {
            dest,
            src,
            mode: a.mode,
            key,
            unpacked: false,
        });
    }
    let client = mirrors.client();
    for reference in unique_references(images) {
        let pin = lock
            .image(reference)
            .ok_or_else(|| unpinned(format!("image {reference}")))?;
        let pulled = match oci::Pulled::cached(cache, reference, &pin.digest, arch)? {
            Some(p) => p,
            None => {
                note(&format!("pulling {reference}@{}", pin.digest));
                let mut r: Reference = reference.parse()?;
                r.digest = Some(pin.digest.clone());
                client.pull(cache, &r, arch)?
            }
        };
        // The archive names the image, so it is kept per name and digest:
        // two tags of the same bytes are two archives.
        let digest = pulled.manifest.digest.clone();
        let archive = cache.entry(
            "images",
            &format!(
                "{}-{}.config.tar",
                digest.trim_start_matches("sha256:"),
                crate::cache::sha256_bytes(reference.as_bytes())
            ),
        );
        if !archive.exists() {
            if let Some(dir) = archive.parent() {
                std::fs::create_dir_all(dir).map_err(fsio::at("creating", dir))?;
            }
            // The image keeps its tag name; the digest is the pin.
            let named = oci::Pulled {
                reference: reference.clone(),
                ..pulled.clone()
            };
            oci::write_archive(cache, &named, &archive, oci::Layers::Outside)?;
        }
        // Hashed once, when the archive is made: builds run this every time.
        let sha = sha256_once(&archive)?;
        let name = archive_name(reference);
        let mut layers = Vec::new();
        for layer in pulled.layers() {
            let hex = layer.digest.trim_start_matches("sha256:");
            let dest = images_dir.join(contract::LAYERS).join(hex);
            // Images share layers; the image carries each once.
            if !files.iter().any(|f: &PayloadFile| f.dest == dest) {
                files.push(PayloadFile {
                    dest,
                    src: fetch::blob_path(cache, hex),
                    mode: 0o755,
                    key: hex.to_owned(),
                    unpacked: true,
                });
            }
            layers.push(RecordedLayer {
                digest: layer.digest.clone(),
                size: layer.size,
            });
        }
        record.images.push(RecordedImage {
            reference: reference.clone(),
            digest,
            index_digest: pulled.index_digest.clone(),
            archive: format!("{}/{name}", contract::IMAGES_DIR),
            archive_sha256: sha.clone(),
            layers,
        });
        files.push(PayloadFile {
            dest: images_dir.join(name),
            src: archive,
            mode: 0o644,
            key: sha,
            unpacked: false,
        });
    }
    for f in &payload.image_files {
        let reference = images.get(&f.image).ok_or_else(|| PayloadError::File {
            path: "payload.image_file".into(),
            message: format!(
                "{}: the image list has no image of that name (it has {})",
                f.image,
                images.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })?;
        let what = format!("{} in {reference}", f.path);
        // Every image in the list was pulled above, its layers recorded.
        let layers = record
            .images
            .iter()
            .find(|i| i.reference == *reference)
            .map_or(&[][..], |i| &i.layers[..]);
        let (layer, src, file_sha256) = from_layers(cache, layers, &f.path, &what)?;
        record.image_files.push(RecordedImageFile {
            image: reference.clone(),
            layer,
            member: f.path.clone(),
            file_sha256: file_sha256.clone(),
            path: f.install.display().to_string(),
        });
        files.push(PayloadFile {
            dest: f.install.strip_prefix("/").unwrap_or(&f.install).to_owned(),
            src,
            mode: f.mode,
            key: file_sha256,
            unpacked: false,
        });
    }
    if !record.images.is_empty() {
        // The list slipway-init imports at boot: archive, name and layers.
        let list: Vec<ListedImage> = record
            .images
            .iter()
            .map(|i| ListedImage {
                archive: i.archive.clone(),
                digest: i.digest.clone(),
                layers: i.layers.clone(),
                reference: i.reference.clone(),
            })
            .collect();
        let text = serde_json::to_string_pretty(&list).unwrap_or_default() + "\n";
        let sha = crate::cache::sha256_bytes(text.as_bytes());
        let path = fetch::blob_path(cache, &sha);
        if !path.exists() {
            fetch::admit(cache, text.as_bytes(), &sha, "the image list", "(memory)")?;
        }
        files.push(PayloadFile {
            dest: contract::in_tree(contract::IMAGE_LIST).to_owned(),
            src: path,
            mode: 0o644,
            key: sha,
            unpacked: false,
        });
    }
    Ok((files, record))
}

/// The pins for the spec's payload: existing ones are kept (a pin changes
/// only when its entry's version or reference does), missing ones are
/// resolved from the source: an artifact's sha256 by downloading it (and,
/// when upstream publishes `<url>.sha256`, checking it against that), an
/// image's digest by resolving its tag (to the index, when it names one).
pub fn refresh(
    cache: &Cache,
    artifacts: &[Artifact],
    images: &BTreeMap<String, String>,
    old: &Lock,
    mirrors: &Mirrors,
    arches: &[&str],
    note: &dyn Fn(&str),
) -> Result<Lock, PayloadError> {
    let mut source = Source::new(cache, mirrors, note);
    let mut lock = Lock::default();
    for arch in arches {
        for a in artifacts {
            let sha256 = match old.artifact(&a.name, &a.version, arch) {
                Some(p) => p.sha256.clone(),
                None => source.artifact(a, arch)?,
            };
            lock.artifacts.push(LockedArtifact {
                name: a.name.clone(),
                version: a.version.clone(),
                arch: (*arch).to_owned(),
                sha256,
            });
        }
    }
    let platform = arches.first().copied().unwrap_or("amd64");
    for reference in unique_references(images) {
        let digest = match old.image(reference) {
            Some(p) => p.digest.clone(),
            None => source.image(reference, platform)?,
        };
        lock.images.push(LockedImage {
            reference: reference.clone(),
            digest,
        });
    }
    Ok(lock)
}

/// A payload entry whose source does not give what its pin says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The lock has no pin for the entry.
    Unpinned { what: String },
    /// The source gave other bytes (an artifact's sha256, the digest an
    /// image's tag resolves to).
    Differs {
        what: String,
        source: String,
        expected: String,
        actual: String,
    },
    /// The source could not be read.
    Unreachable { what: String, message: String },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unpinned { what } => write!(f, "{what}: no pin"),
            Self::Differs {
                what,
                source,
                expected,
                actual,
            } => write!(f, "{what}: {source} gives {actual}, pinned {expected}"),
            Self::Unreachable { what, message } => {
                // The source's error usually names the entry already.
                let named = what.split_once(' ').map_or("", |(_, name)| name);
                let detail = message
                    .strip_prefix(named)
                    .and_then(|m| m.strip_prefix(": "))
                    .unwrap_or(message);
                write!(f, "{what}: {detail}")
            }
        }
    }
}

/// Downloads every artifact and resolves every image tag, as a refresh
/// would, and compares each with its pin; returns every entry that differs
/// (all of them, not only the first).
pub fn check(
    cache: &Cache,
    artifacts: &[Artifact],
    images: &BTreeMap<String, String>,
    lock: &Lock,
    mirrors: &Mirrors,
    arches: &[&str],
    note: &dyn Fn(&str),
) -> Vec<Mismatch> {
    let mut source = Source::new(cache, mirrors, note);
    let mut found = Vec::new();
    let mut compare = |what: String,
                       pinned: Option<&str>,
                       got: Result<String, PayloadError>,
                       from: String| {
        match (pinned, got) {
            (None, _) => found.push(Mismatch::Unpinned { what }),
            (Some(_), Err(e)) => found.push(Mismatch::Unreachable {
                what,
                message: e.to_string(),
            }),
            (Some(expected), Ok(actual)) if expected != actual => found.push(Mismatch::Differs {
                what,
                source: from,
                expected: expected.to_owned(),
                actual,
            }),
            _ => {}
        }
    };
    for arch in arches {
        for a in artifacts {
            let pin = lock
                .artifact(&a.name, &a.version, arch)
                .map(|p| p.sha256.as_str());
            let got = source.artifact(a, arch);
            compare(
                format!("artifact {} {} {arch}", a.name, a.version),
                pin,
                got,
                mirrors.artifact_url(&a.url_for(arch)),
            );
        }
    }
    let platform = arches.first().copied().unwrap_or("amd64");
    for reference in unique_references(images) {
        let pin = lock.image(reference).map(|p| p.digest.as_str());
        let got = source.image(reference, platform);
        let from = match &mirrors.registry {
            Some(m) => format!("{m} (mirroring {reference})"),
            None => reference.clone(),
        };
        compare(format!("image {reference}"), pin, got, from);
    }
    found
}

/// Where a refresh or a check reads the payload from: each download once.
struct Source<'a> {
    cache: &'a Cache,
    mirrors: &'a Mirrors,
    note: &'a dyn Fn(&str),
    agent: ureq::Agent,
    client: oci::Client,
    /// Downloads already hashed, by upstream URL (archives shared by members).
    by_url: BTreeMap<String, String>,
}

impl<'a> Source<'a> {
    fn new(cache: &'a Cache, mirrors: &'a Mirrors, note: &'a dyn Fn(&str)) -> Self {
        Self {
            cache,
            mirrors,
            note,
            agent: fetch::agent(),
            client: mirrors.client(),
            by_url: BTreeMap::new(),
        }
    }

    /// The sha256 of an artifact's download, checked against upstream's
    /// `<url>.sha256` where there is one.
    fn artifact(&mut self, a: &Artifact, arch: &str) -> Result<String, PayloadError> {
        let upstream = a.url_for(arch);
        if let Some(sha256) = self.by_url.get(&upstream) {
            return Ok(sha256.clone());
        }
        let what = format!("{} {} {arch}", a.name, a.version);
        let url = self.mirrors.artifact_url(&upstream);
        (self.note)(&format!("resolving {what} from {url}"));
        let mut reader = fetch::open(&self.agent, &what, &url)?;
        let mut hash = sha2::Sha256::new();
        std::io::copy(&mut reader, &mut HashWriter(&mut hash)).map_err(|e| FetchError::Source {
            what: what.clone(),
            url: url.clone(),
            message: e.to_string(),
        })?;
        let sha256 = hex::encode(sha2::Digest::finalize(hash));
        if let Ok(mut published) = fetch::open(&self.agent, &what, &format!("{url}.sha256")) {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut published, &mut text);
            let upstream = text.split_whitespace().next().unwrap_or("");
            if fetch::is_sha256(upstream) && upstream != sha256 {
                return Err(FetchError::Digest {
                    what,
                    url,
                    expected: upstream.to_owned(),
                    actual: sha256,
                }
                .into());
            }
        }
        self.by_url.insert(upstream, sha256.clone());
        Ok(sha256)
    }

    /// The digest an image's tag resolves to: its index when it names one
    /// (whose `arch` image is pulled and checked).
    fn image(&mut self, reference: &str, arch: &str) -> Result<String, PayloadError> {
        (self.note)(&format!("resolving {reference}"));
        let pulled = self.client.pull(self.cache, &reference.parse()?, arch)?;
        Ok(pulled.index_digest.unwrap_or(pulled.manifest.digest))
    }
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sha256 of a file in the cache, computed on first use and kept next
/// to it (`<file>.sha256`), so unchanged builds never re-read the payload.
fn sha256_once(path: &Path) -> Result<String, PayloadError> {
    let sidecar = path.with_extension("sha256");
    if let Ok(sha) = std::fs::read_to_string(&sidecar) {
        if fetch::is_sha256(sha.trim()) {
            return Ok(sha.trim().to_owned());
        }
    }
    let sha = crate::cache::sha256_file(path).map_err(fsio::at("hashing", path))?;
    let tmp = sidecar.with_extension("sha256.tmp");
    std::fs::write(&tmp, &sha).map_err(fsio::at("writing", &tmp))?;
    std::fs::rename(&tmp, &sidecar).map_err(fsio::at("renaming", &sidecar))?;
    Ok(sha)
}

/// One member of a `.tar.gz` in the cache, extracted once into the cache;
/// returns it and its sha256.
fn extract(
    cache: &Cache,
    archive: &Path,
    sha256: &str,
    member: &str,
    what: &str,
) -> Result<(PathBuf, String), PayloadError> {
    match find_member(cache, archive, sha256, member, what)? {
        Member::Found(path, sha) => Ok((path, sha)),
        Member::Absent | Member::Deleted => Err(PayloadError::File {
            path: archive.display().to_string(),
            message: format!("{what}: the archive has no member {member}"),
        }),
    }
}

/// A file of an image, from the topmost of its `layers` (base first) that
/// holds it or deletes it, as a container would see it; returns the
/// layer's digest, the file extracted into the cache and its sha256.
fn from_layers(
    cache: &Cache,
    layers: &[RecordedLayer],
    path: &str,
    what: &str,
) -> Result<(String, PathBuf, String), PayloadError> {
    let member = path.trim_start_matches('/');
    for layer in layers.iter().rev() {
        let hex = layer.digest.trim_start_matches("sha256:");
        let blob = fetch::blob_path(cache, hex);
        match find_member(cache, &blob, hex, member, what)? {
            Member::Found(file, sha) => return Ok((layer.digest.clone(), file, sha)),
            Member::Deleted => {
                return Err(PayloadError::File {
                    path: blob.display().to_string(),
                    message: format!("{what}: layer {} deletes it", layer.digest),
                })
            }
            Member::Absent => {}
        }
    }
    Err(PayloadError::File {
        path: "payload.image_file".into(),
        message: format!("{what}: no layer of the image holds it"),
    })
}

/// What a tar holds under a member's name.
enum Member {
    /// Extracted into the cache, with its sha256.
    Found(PathBuf, String),
    /// Deleted, as an image layer deletes what the layers below it hold: a
    /// whiteout of it or of a directory above it, or a directory above it
    /// made opaque.
    Deleted,
    Absent,
}

/// The entries of an image layer that delete `path` from the layers below:
/// `.wh.<name>` beside it or beside any directory above it, and the opaque
/// marker of any directory above it.
fn deletions_of(path: &Path) -> Vec<PathBuf> {
    let mut marks = Vec::new();
    for above in path.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        let parent = above.parent().unwrap_or(Path::new(""));
        let name = above.file_name().unwrap_or_default().to_string_lossy();
        marks.push(parent.join(format!(".wh.{name}")));
        if above != path {
            marks.push(above.join(".wh..wh..opq"));
        }
    }
    marks
}

/// Looks for `member` in a tar in the cache, gzip-compressed or not (whose
/// sha256 is `sha256`); a regular file is extracted once into the cache.
fn find_member(
    cache: &Cache,
    archive: &Path,
    sha256: &str,
    member: &str,
    what: &str,
) -> Result<Member, PayloadError> {
    let dest = cache.entry("extracted", &format!("{sha256}/{member}"));
    if dest.exists() {
        let sha = sha256_once(&dest)?;
        return Ok(Member::Found(dest, sha));
    }
    let fail = |message: String| PayloadError::File {
        path: archive.display().to_string(),
        message: format!("{what}: {message}"),
    };
    let mut tar = tar::Archive::new(crate::build::layer::open(archive).map_err(fail)?);
    let wanted = Path::new(member.trim_start_matches("./"));
    let deletions = deletions_of(wanted);
    // A layer may delete a directory and fill it again: what it holds
    // itself wins, whatever the order of its entries.
    let mut deleted = false;
    for entry in tar.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| fail(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let path = Path::new(path.trim_start_matches("./"));
        if deletions.iter().any(|d| d == path) {
            deleted = true;
            continue;
        }
        if path != wanted {
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(fail(format!("{member} is not a regular file")));
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(fsio::at("creating", dir))?;
        let tmp = dest.with_extension("tmp");
        let mut out = std::fs::File::create(&tmp).map_err(fsio::at("creating", &tmp))?;
        std::io::copy(&mut entry, &mut out).map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&tmp, &dest).map_err(fsio::at("renaming", &dest))?;
        let sha = sha256_once(&dest)?;
        return Ok(Member::Found(dest, sha));
    }
    Ok(if deleted {
        Member::Deleted
    } else {
        Member::Absent
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artifact_mirror_keeps_the_upstream_path() {
        let m = Mirrors {
            artifacts: Some("file:///srv/mirror/".into()),
            registry: None,
        };
        assert_eq!(
            m.artifact_url("https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubelet"),
            "file:///srv/mirror/release/v1.37.2/bin/linux/amd64/kubelet"
        );
        assert_eq!(
            Mirrors::default().artifact_url("https://x.example/a"),
            "https://x.example/a"
        );
    }

    #[test]
    fn an_artifact_url_names_its_architecture() {
        let a = Artifact {
            name: "runc".into(),
            version: "v1.4.3".into(),
            url: "https://github.com/opencontainers/runc/releases/download/v1.4.3/runc.{arch}"
                .into(),
            install: "/usr/bin/runc".into(),
            extract: None,
            mode: 0o755,
        };
        assert!(a.url_for("arm64").ends_with("/v1.4.3/runc.arm64"));
        let fixed = Artifact {
            url: "https://example.com/tool".into(),
            ..a
        };
        assert_eq!(fixed.url_for("arm64"), "https://example.com/tool");
    }

    #[test]
    fn an_unpinned_entry_stops_the_build_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = [Artifact {
            name: "kubelet".into(),
            version: "v1.36.3".into(),
            url: "https://dl.k8s.io/release/v1.36.3/bin/linux/{arch}/kubelet".into(),
            install: "/usr/bin/kubelet".into(),
            extract: None,
            mode: 0o755,
        }];
        let inputs = Inputs {
            images: BTreeMap::new(),
            lock_path: PathBuf::from("payload.lock"),
            lock: Lock::default(),
            mirrors: Mirrors::default(),
        };
        let payload = Payload {
            artifacts: artifacts.to_vec(),
            ..Payload::default()
        };
        let err = resolve(
            &Cache::at(dir.path().to_owned()),
            &payload,
            &inputs,
            "arm64",
            &|_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("artifact kubelet v1.36.3 arm64 has no pin in payload.lock"),
            "{err}"
        );
        assert!(err.contains("image-builder lock"), "{err}");
    }

    #[test]
    fn a_files_sha256_is_computed_once_and_kept_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("image.tar");
        std::fs::write(&file, b"archive").unwrap();
        let sha = sha256_once(&file).unwrap();
        assert_eq!(sha, crate::cache::sha256_bytes(b"archive"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("image.sha256")).unwrap(),
            sha
        );
        // Later calls read the kept value, not the file.
        std::fs::write(&file, b"changed behind the cache's back").unwrap();
        assert_eq!(sha256_once(&file).unwrap(), sha);
    }

    #[test]
    fn archive_names_are_path_safe() {
        assert_eq!(
            archive_name("registry.k8s.io/coredns/coredns:v1.15.0"),
            "registry.k8s.io_coredns_coredns_v1.15.0.tar"
        );
    }

    /// A layer of `(path, content)` entries (an empty content and a
    /// `.wh.` name make a whiteout), gzip-compressed or not, stored in the
    /// cache as a blob.
    fn layer(cache: &Cache, gzip: bool, entries: &[(&str, &[u8])]) -> RecordedLayer {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            tar.append_data(&mut h, path, *data).unwrap();
        }
        let mut bytes = tar.into_inner().unwrap();
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &bytes).unwrap();
            bytes = gz.finish().unwrap();
        }
        let hex = crate::cache::sha256_bytes(&bytes);
        let blob = fetch::blob_path(cache, &hex);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, &bytes).unwrap();
        RecordedLayer {
            digest: format!("sha256:{hex}"),
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn a_file_comes_from_the_topmost_layer_that_holds_it_or_deletes_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_owned());
        // Compressed and not, as registries hold them.
        let base = layer(&cache, true, &[("flannel", b"base"), ("bin/sh", b"sh")]);
        let top = layer(&cache, false, &[("flannel", b"top")]);
        let unrelated = layer(&cache, true, &[("etc/motd", b"hi")]);
        let layers = [base.clone(), top.clone(), unrelated];
        let (digest, file, sha) = from_layers(&cache, &layers, "/flannel", "the plugin").unwrap();
        assert_eq!(digest, top.digest);
        assert_eq!(std::fs::read(&file).unwrap(), b"top");
        assert_eq!(sha, crate::cache::sha256_bytes(b"top"));
        // A file only the base holds comes from the base.
        let (digest, file, _) = from_layers(&cache, &layers, "/bin/sh", "sh").unwrap();
        assert_eq!(
            (digest, std::fs::read(&file).unwrap()),
            (base.digest.clone(), b"sh".to_vec())
        );

        let deleted = layer(&cache, false, &[(".wh.flannel", b"")]);
        let err = from_layers(
            &cache,
            &[base.clone(), deleted.clone()],
            "/flannel",
            "the plugin",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("the plugin: layer {} deletes it", deleted.digest)),
            "{err}"
        );
        // A directory above it deleted, or made opaque, deletes it too;
        // unless the opaque layer holds it again.
        for marks in [&[(".wh.bin", &b""[..])][..], &[("bin/.wh..wh..opq", b"")]] {
            let above = layer(&cache, true, marks);
            let err = from_layers(&cache, &[base.clone(), above.clone()], "/bin/sh", "sh")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("sh: layer {} deletes it", above.digest)),
                "{err}"
            );
        }
        let refilled = layer(
            &cache,
            false,
            &[("bin/sh", b"new"), ("bin/.wh..wh..opq", b"")],
        );
        let (digest, file, _) =
            from_layers(&cache, &[base.clone(), refilled.clone()], "/bin/sh", "sh").unwrap();
        assert_eq!(
            (digest, std::fs::read(&file).unwrap()),
            (refilled.digest, b"new".to_vec())
        );
        let err = from_layers(&cache, &[base], "/opt/bin/flanneld", "flanneld")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("flanneld: no layer of the image holds it"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_is_not_taken_for_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_owned());
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, "flannel/", std::io::empty())
            .unwrap();
        let bytes = tar.into_inner().unwrap().finish().unwrap();
        let blob = dir.path().join("layer.tar.gz");
        std::fs::write(&blob, bytes).unwrap();
        let err = extract(&cache, &blob, "abc", "flannel", "the plugin")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flannel is not a regular file"), "{err}");
    }
}
