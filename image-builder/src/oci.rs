//! Container images over the OCI distribution API, in Rust: pull by tag or
//! digest (a multi-arch index resolved to one platform, anonymous or bearer
//! token auth, plain HTTP for loopback registries), every manifest and blob
//! checked against its digest on the way into the cache; push (for the test
//! fixtures); and deterministic OCI archives (`oci-layout` + `index.json` +
//! `blobs/`, as a tar) whose manifest and config slipway-init hands to
//! containerd at boot.

use crate::cache::Cache;
use crate::fetch::{self, FetchError};
use crate::fsio::{self, PathError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// The name containerd gives an imported image.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0:?} is not an image reference (registry/repository[:tag][@sha256:digest])")]
    Reference(String),
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("{image}: {message}")]
    Image { image: String, message: String },
    #[error("{image}: {0}", image = .1)]
    Blob(#[source] FetchError, String),
    #[error(transparent)]
    Io(#[from] PathError),
}

/// `registry/repository[:tag][@sha256:…]`; the registry must be named.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl FromStr for Reference {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, OciError> {
        let bad = || OciError::Reference(s.to_owned());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(bad)?;
                if !fetch::is_sha256(hex) {
                    return Err(bad());
                }
                (r, Some(d.to_owned()))
            }
            None => (s, None),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(bad)?;
        let host_like = registry.contains('.') || registry.contains(':') || registry == "localhost";
        if !host_like || path.is_empty() {
            return Err(bad());
        }
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_owned())),
            _ => (path, None),
        };
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if repository.is_empty() || !repository.chars().all(valid) {
            return Err(bad());
        }
        if tag
            .as_deref()
            .is_some_and(|t| t.is_empty() || t.len() > 128)
            || (tag.is_none() && digest.is_none())
        {
            return Err(bad());
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl Reference {
    /// What to ask the registry for: the digest when pinned, else the tag.
    fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The name containerd will list (tag kept, digest dropped).
    pub fn name(&self) -> String {
        let mut r = self.clone();
        r.digest = None;
        r.to_string()
    }
}

/// A descriptor: what a manifest says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image pulled into the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// As asked for (the name the image keeps).
    pub reference: String,
    /// The platform's image manifest.
    pub manifest: Descriptor,
    /// The multi-arch index it came from, if any.
    pub index_digest: Option<String>,
    /// Config and layers, in manifest order.
    pub blobs: Vec<Descriptor>,
}

/// Redirects every registry to one place (air-gapped sites, tests):
/// `registry.k8s.io/etcd:3.6` is fetched from `<mirror>/etcd:3.6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `http://127.0.0.1:5000` or `https://mirror.example`.
    pub base: String,
}

/// A distribution-API client.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    mirror: Option<Mirror>,
    /// Bearer tokens by registry and scope.
    tokens: std::sync::Mutex<BTreeMap<String, String>>,
}

fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `key="value"` pairs of a `WWW-Authenticate: Bearer …` challenge.
fn challenge(header: &str) -> Option<BTreeMap<String, String>> {
    let rest = header.strip_prefix("Bearer ")?;
    let mut out = BTreeMap::new();
    let mut s = rest;
    while let Some((k, v)) = s.split_once("=\"") {
        let (value, tail) = v.split_once('"')?;
        out.insert(
            k.trim().trim_start_matches(',').trim().to_owned(),
            value.to_owned(),
        );
        s = tail;
    }
    Some(out)
}

impl Client {
    pub fn new(mirror: Option<Mirror>) -> Self {
        Self {
            agent: fetch::agent(),
            mirror,
            tokens: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Base URL and repository path to use for `r` (after the mirror).
    fn route(&self, r: &Reference) -> (String, String) {
        match &self.mirror {
            Some(m) => (
                m.base.trim_end_matches('/').to_owned(),
                r.repository.clone(),
            ),
            None => {
                let scheme = if is_loopback(&r.registry) {
                    "http"
                } else {
                    "https"
                };
                (format!("{scheme}://{}", r.registry), r.repository.clone())
            }
        }
    }

    fn registry_err(base: &str, message: impl Into<String>) -> OciError {
        OciError::Registry {
            registry: base.to_owned(),
            message: message.into(),
        }
    }

    /// GET with the token dance: on a bearer challenge, fetch a token from
    /// the realm it names and try once more.
    fn get(&self, base: &str, url: &str, accept: Option<&str>) -> Result<ureq::Response, OciError> {
        let key = |scope: &str| format!("{base} {scope}");
        let send = |token: Option<&String>| {
            let mut req = self.agent.get(url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            req.call()
        };
        let cached = self.tokens.lock().ok().and_then(|t| {
            t.iter()
                .find(|(k, _)| k.starts_with(base))
                .map(|(_, v)| v.clone())
        });
        match send(cached.as_ref()) {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(401, resp)) => {
                let header = resp.header("WWW-Authenticate").unwrap_or("").to_owned();
                let params = challenge(&header).ok_or_else(|| {
                    Self::registry_err(
                        base,
                        format!("unauthorized, and no bearer challenge ({header:?})"),
                    )
                })?;
                let realm = params
                    .get("realm")
                    .ok_or_else(|| Self::registry_err(base, "bearer challenge without a realm"))?;
                let mut token_req = self.agent.get(realm);
                for k in ["service", "scope"] {
                    if let Some(v) = params.get(k) {
                        token_req = token_req.query(k, v);
                    }
                }
                let body: Value = token_req
                    .call()
                    .map_err(|e| Self::registry_err(base, format!("token from {realm}: {e}")))?
                    .into_json()
                    .map_err(|e| Self::registry_err(base, format!("token from {realm}: {e}")))?;
                let token = body["token"]
                    .as_str()
                    .or(body["access_token"].as_str())
                    .ok_or_else(|| Self::registry_err(base, format!("{realm} returned no token")))?
                    .to_owned();
                if let Ok(mut t) = self.tokens.lock() {
                    t.insert(
                        key(params.get("scope").map_or("", String::as_str)),
                        token.clone(),
                    );
                }
                send(Some(&token)).map_err(|e| Self::registry_err(base, describe(url, e)))
            }
            Err(e) => Err(Self::registry_err(base, describe(url, e))),
        }
    }

    fn manifest(
        &self,
        r: &Reference,
        base: &str,
        repo: &str,
        reference: &str,
    ) -> Result<(String, Vec<u8>), OciError> {
        let url = format!("{base}/v2/{repo}/manifests/{reference}");
        let resp = self.get(base, &url, Some(ACCEPT))?;
        let media = resp.content_type().to_owned();
        let mut body = Vec::new();
        resp.into_reader()
            .take(8 << 20)
            .read_to_end(&mut body)
            .map_err(|e| Self::registry_err(base, format!("reading {url}: {e}")))?;
        if reference.starts_with("sha256:") && sha256_of(&body) != reference {
            return Err(OciError::Image {
                image: r.to_string(),
                message: format!(
                    "manifest {reference} arrived with digest {}",
                    sha256_of(&body)
                ),
            });
        }
        // Trust the document's own mediaType over the header when present.
        let doc: Value = serde_json::from_slice(&body).map_err(|e| OciError::Image {
            image: r.to_string(),
            message: format!("manifest is not JSON: {e}"),
        })?;
        let media = doc["mediaType"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or(media);
        Ok((media, body))
    }

    /// Pulls `reference` for linux/`arch` into the cache.
    pub fn pull(
        &self,
        cache: &Cache,
        reference: &Reference,
        arch: &str,
    ) -> Result<Pulled, OciError> {
        let image = reference.to_string();
        let (base, repo) = self.route(reference);
        let (mut media, mut body) =
            self.manifest(reference, &base, &repo, reference.manifest_ref())?;
        let mut index_digest = None;
        if media == OCI_INDEX || media == DOCKER_LIST {
            let digest = sha256_of(&body);
            store(cache, &body, &digest, &image)?;
            let child = platform_manifest(&body, &image, arch)?;
            index_digest = Some(digest);
            (media, body) = self.manifest(reference, &base, &repo, &child)?;
        }
        if media != OCI_MANIFEST && media != DOCKER_MANIFEST {
            return Err(OciError::Image {
                image,
                message: format!("unsupported manifest type {media:?}"),
            });
        }
        let digest = sha256_of(&body);
        store(cache, &body, &digest, &image)?;
        let (_, blobs) = manifest_blobs(&body, &image, "image manifest")?;
        for b in &blobs {
            let hex = b.digest.strip_prefix("sha256:").unwrap_or("");
            if fetch::blob_path(cache, hex).exists() {
                continue;
            }
            let url = format!("{base}/v2/{repo}/blobs/{}", b.digest);
            let resp = self.get(&base, &url, None)?;
            fetch::admit(
                cache,
                resp.into_reader(),
                hex,
                &format!("blob {}", b.digest),
                &url,
            )
            .map_err(|e| OciError::Blob(e, image.clone()))?;
        }
        Ok(Pulled {
            reference: image,
            manifest: Descriptor {
                media_type: media,
                size: body.len() as u64,
                digest,
                annotations: None,
            },
            index_digest,
            blobs,
        })
    }
}

/// What a failed registry request said: its status and the start of its
/// body, or the transport's error.
pub fn describe(what: &str, e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            format!(
                "{what}: HTTP {code} {}",
                body.trim().chars().take(200).collect::<String>()
            )
        }
        ureq::Error::Transport(t) => format!("{what}: {t}"),
    }
}

/// Whether a manifest document is a multi-arch index.
fn is_index(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|doc| {
        doc["mediaType"] == OCI_INDEX
            || doc["mediaType"] == DOCKER_LIST
            || (doc["mediaType"].is_null() && doc["manifests"].is_array())
    })
}

/// The digest of an index's linux/`arch` image manifest.
fn platform_manifest(index: &[u8], image: &str, arch: &str) -> Result<String, OciError> {
    let fail = |message: String| OciError::Image {
        image: image.to_owned(),
        message,
    };
    let doc: Value = serde_json::from_slice(index).map_err(|e| fail(e.to_string()))?;
    doc["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| fail(format!("the index has no linux/{arch} image")))
}

/// Puts `bytes` into the cache under `digest` (`sha256:…`).
pub fn store(cache: &Cache, bytes: &[u8], digest: &str, image: &str) -> Result<PathBuf, OciError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let path = fetch::blob_path(cache, hex);
    if path.exists() {
        return Ok(path);
    }
    fetch::admit(cache, bytes, hex, &format!("manifest {digest}"), "(memory)")
        .map_err(|e| OciError::Blob(e, image.to_owned()))
}

/// What an image manifest names: its media type (when it states one), then
/// config and layers in manifest order.
fn manifest_blobs(
    body: &[u8],
    image: &str,
    what: &str,
) -> Result<(Option<String>, Vec<Descriptor>), OciError> {
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        config: Descriptor,
        layers: Vec<Descriptor>,
    }
    let m: Manifest = serde_json::from_slice(body).map_err(|e| OciError::Image {
        image: image.to_owned(),
        message: format!("{what}: {e}"),
    })?;
    let mut blobs = vec![m.config];
    blobs.extend(m.layers);
    Ok((m.media_type, blobs))
}

/// Which blobs an OCI archive carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// Everything: the archive stands alone.
    Included,
    /// Manifest and config only; the layers travel as separate files
    /// (the image keeps them once, where containerd can refer to them).
    Outside,
}

impl Pulled {
    /// The layers, in manifest order (the config is `blobs[0]`).
    pub fn layers(&self) -> &[Descriptor] {
        self.blobs.get(1..).unwrap_or_default()
    }

    /// The image as an earlier pull left it in the cache, read from its
    /// manifest there without touching a registry; `None` when the
    /// manifest or any blob is missing.
    ///
    /// `digest` may name a multi-arch index; its linux/`arch` image is then
    /// the one looked for, and the index is recorded as its origin.
    pub fn cached(
        cache: &Cache,
        reference: &str,
        digest: &str,
        arch: &str,
    ) -> Result<Option<Self>, OciError> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let path = fetch::blob_path(cache, hex);
        let Ok(body) = std::fs::read(&path) else {
            return Ok(None);
        };
        if is_index(&body) {
            let child = platform_manifest(&body, reference, arch)?;
            let pulled = Self::cached(cache, reference, &child, arch)?;
            return Ok(pulled.map(|p| Self {
                index_digest: Some(digest.to_owned()),
                ..p
            }));
        }
        let (media_type, blobs) =
            manifest_blobs(&body, reference, &format!("cached manifest {digest}"))?;
        let present = |d: &Descriptor| {
            let hex = d.digest.strip_prefix("sha256:").unwrap_or("");
            fetch::blob_path(cache, hex).exists()
        };
        if !blobs.iter().all(present) {
            return Ok(None);
        }
        Ok(Some(Pulled {
            reference: reference.to_owned(),
            manifest: Descriptor {
                media_type: media_type.unwrap_or_else(|| OCI_MANIFEST.to_owned()),
                digest: digest.to_owned(),
                size: body.len() as u64,
                annotations: None,
            },
            index_digest: None,
            blobs,
        }))
    }
}

/// Writes `image` as an OCI archive (a tar of an OCI image layout) whose
/// index names it for containerd. Same image, same bytes.
pub fn write_archive(
    cache: &Cache,
    image: &Pulled,
    out: &Path,
    layers: Layers,
) -> Result<(), OciError> {
    let reference: Reference = image.reference.parse()?;
    let mut annotations = BTreeMap::new();
    annotations.insert(CONTAINERD_NAME.to_owned(), reference.name());
    if let Some(t) = &reference.tag {
        annotations.insert("org.opencontainers.image.ref.name".to_owned(), t.clone());
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [Descriptor { annotations: Some(annotations), ..image.manifest.clone() }],
    });
    let index = serde_json::to_vec(&index).map_err(|e| OciError::Image {
        image: image.reference.clone(),
        message: e.to_string(),
    })?;
    let tmp = out.with_extension("tmp");
    let file = std::fs::File::create(&tmp).map_err(fsio::at("creating", &tmp))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let add = |tar: &mut tar::Builder<_>, name: &str, data: &mut dyn Read, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(size);
        h.set_mtime(0);
        tar.append_data(&mut h, name, data)
            .map_err(fsio::at("writing", &tmp))
    };
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    add(
        &mut tar,
        "oci-layout",
        &mut &layout[..],
        layout.len() as u64,
    )?;
    add(&mut tar, "index.json", &mut &index[..], index.len() as u64)?;
    let mut all: Vec<&Descriptor> = vec![&image.manifest];
    match layers {
        Layers::Included => all.extend(&image.blobs),
        Layers::Outside => all.extend(image.blobs.first()),
    }
    for d in all {
        let hex = d.digest.strip_prefix("sha256:").unwrap_or("");
        let path = fetch::blob_path(cache, hex);
        let mut f = std::fs::File::open(&path).map_err(fsio::at("opening", &path))?;
        add(&mut tar, &format!("blobs/sha256/{hex}"), &mut f, d.size)?;
    }
    tar.into_inner()
        .map_err(fsio::at("writing", &tmp))?
        .into_inner()
        .map_err(|e| fsio::at("writing", &tmp)(e.into_error()))?
        .sync_all()
        .map_err(fsio::at("syncing", &tmp))?;
    std::fs::rename(&tmp, out).map_err(fsio::at("renaming", out))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print_back() {
        for s in [
            "registry.k8s.io/etcd:3.6.16-0",
            "ghcr.io/flannel-io/flannel:v0.28.10",
            "127.0.0.1:5000/kube-apiserver:v1.37.2",
            "localhost/pause@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "registry.k8s.io/coredns/coredns:v1.15.0@sha256:1111111111111111111111111111111111111111111111111111111111111111",
        ] {
            let r: Reference = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let r: Reference = "127.0.0.1:5000/a/b:v1".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "a/b", Some("v1"))
        );
        for bad in [
            "etcd:3.6",
            "library/etcd:1",
            "registry.k8s.io/",
            "registry.k8s.io/etcd",
            "registry.k8s.io/Etcd:1",
            "r.io/x@sha256:zz",
            "r.io/x@md5:00",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn bearer_challenges_are_read() {
        let c = challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:etcd:pull""#).unwrap();
        assert_eq!(c["realm"], "https://auth.example/token");
        assert_eq!(c["service"], "registry.example");
        assert_eq!(c["scope"], "repository:etcd:pull");
        assert!(challenge("Basic realm=\"x\"").is_none());
    }
}
