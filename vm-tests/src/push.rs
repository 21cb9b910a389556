//! Making images and pushing them to the tests' own registries: the
//! fixtures' payload and the OCI tests' images. The image builder itself
//! only pulls; this is the other side of the distribution API, kept out of
//! it.

use anyhow::{anyhow, Context, Result};
use image_builder::cache::Cache;
use image_builder::fetch;
use image_builder::oci::{
    self, Descriptor, Pulled, Reference, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST,
};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Pushes images a registry that needs no authentication.
#[derive(Debug)]
pub struct Pusher {
    agent: ureq::Agent,
    /// Every image goes here (`http://127.0.0.1:port`) under its
    /// repository's name; without it, to its reference's own registry.
    mirror: Option<String>,
}

fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn describe(what: &str, e: ureq::Error) -> anyhow::Error {
    anyhow!(oci::describe(what, e))
}

impl Pusher {
    /// To each reference's own registry (a loopback one, over http).
    pub fn direct() -> Self {
        Self {
            agent: fetch::agent(),
            mirror: None,
        }
    }

    /// Everything into the registry at `base` (`http://host:port`).
    pub fn to(base: &str) -> Self {
        Self {
            agent: fetch::agent(),
            mirror: Some(base.trim_end_matches('/').to_owned()),
        }
    }

    fn base(&self, target: &Reference) -> String {
        self.mirror
            .clone()
            .unwrap_or_else(|| format!("http://{}", target.registry))
    }

    /// Pushes an image whose manifest and blobs are in the cache, under the
    /// target's tag (or its digest).
    pub fn push(&self, cache: &Cache, target: &Reference, image: &Pulled) -> Result<()> {
        let base = self.base(target);
        let repo = &target.repository;
        for d in &image.blobs {
            self.put_blob(cache, &base, repo, d)?;
        }
        let manifest = read_blob(cache, &image.manifest.digest)?;
        let tag = target.tag.as_deref().unwrap_or(&image.manifest.digest);
        self.agent
            .put(&format!("{base}/v2/{repo}/manifests/{tag}"))
            .set("Content-Type", &image.manifest.media_type)
            .send_bytes(&manifest)
            .map_err(|e| describe(&format!("{base}: putting manifest {tag}"), e))?;
        Ok(())
    }

    fn put_blob(&self, cache: &Cache, base: &str, repo: &str, d: &Descriptor) -> Result<()> {
        let head = format!("{base}/v2/{repo}/blobs/{}", d.digest);
        if self.agent.head(&head).call().is_ok() {
            return Ok(());
        }
        let start = self
            .agent
            .post(&format!("{base}/v2/{repo}/blobs/uploads/"))
            .send_bytes(&[])
            .map_err(|e| describe(&format!("{base}: starting an upload"), e))?;
        let location = start
            .header("Location")
            .with_context(|| format!("{base}: an upload without a Location"))?;
        let location = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location.to_owned()
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        self.agent
            .put(&format!("{location}{sep}digest={}", d.digest))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(&read_blob(cache, &d.digest)?)
            .map_err(|e| describe(&format!("{base}: uploading {}", d.digest), e))?;
        Ok(())
    }

    /// Pushes `image` by digest and, under the target's tag, an index that
    /// names it as the linux/`arch` image: a tag resolves to an index, as
    /// upstream's multi-arch images do. Returns the index's digest.
    pub fn push_indexed(
        &self,
        cache: &Cache,
        target: &Reference,
        image: &Pulled,
        arch: &str,
    ) -> Result<String> {
        let by_digest = Reference {
            tag: None,
            digest: None,
            ..target.clone()
        };
        self.push(cache, &by_digest, image)?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": image.manifest.media_type,
                "digest": image.manifest.digest,
                "size": image.manifest.size,
                "platform": {"architecture": arch, "os": "linux"},
            }],
        });
        let body = serde_json::to_vec(&index)?;
        let digest = sha256_of(&body);
        oci::store(cache, &body, &digest, &target.to_string())?;
        let index = Pulled {
            reference: target.to_string(),
            manifest: Descriptor {
                media_type: OCI_INDEX.to_owned(),
                size: body.len() as u64,
                digest: digest.clone(),
                annotations: None,
            },
            index_digest: None,
            blobs: Vec::new(),
        };
        self.push(cache, target, &index)?;
        Ok(digest)
    }
}

fn read_blob(cache: &Cache, digest: &str) -> Result<Vec<u8>> {
    let path = fetch::blob_path(cache, digest.trim_start_matches("sha256:"));
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// A single-layer image made from files (`path in image`, content, mode),
/// stored in `cache`. Deterministic: the same files give the same digests.
pub fn image_from_files(
    cache: &Cache,
    reference: &str,
    arch: &str,
    files: &[(&str, &[u8], u32)],
    entrypoint: &[&str],
) -> Result<Pulled> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path.trim_start_matches('/'));
        while let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(parent.to_owned());
            p = parent;
        }
    }
    for d in &dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        layer.append_data(&mut h, format!("{}/", d.display()), std::io::empty())?;
    }
    for (path, data, mode) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        layer.append_data(&mut h, path.trim_start_matches('/'), *data)?;
    }
    let layer = layer.into_inner()?;
    let layer_digest = sha256_of(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = sha256_of(&config);
    let blobs = vec![
        Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: config_digest.clone(),
            size: config.len() as u64,
            annotations: None,
        },
        Descriptor {
            media_type: OCI_LAYER.into(),
            digest: layer_digest.clone(),
            size: layer.len() as u64,
            annotations: None,
        },
    ];
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": blobs[0],
        "layers": [blobs[1]],
    }))?;
    let manifest_digest = sha256_of(&manifest);
    oci::store(cache, &config, &config_digest, reference)?;
    oci::store(cache, &layer, &layer_digest, reference)?;
    oci::store(cache, &manifest, &manifest_digest, reference)?;
    Ok(Pulled {
        reference: reference.to_owned(),
        manifest: Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: manifest_digest,
            size: manifest.len() as u64,
            annotations: None,
        },
        index_digest: None,
        blobs,
    })
}
