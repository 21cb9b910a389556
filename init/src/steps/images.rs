//! The pre-pulled container images, handed to containerd before kubelet
//! starts, so a node never needs a registry for what the image carries;
//! each is labelled pinned so kubelet's image garbage collection never
//! removes it. Importing again is harmless (containerd keeps content by
//! digest, and a snapshot made is found by its name), so this runs at
//! every boot.
//!
//! The image carries every layer once, unpacked at build time under
//! `/usr/share/slipway/images/layers/<digest>/` on the dm-verity-protected
//! root, as overlayfs stacks it. Unpacking at boot meant reading each
//! compressed layer back through the root's decompression and writing
//! its files again: under emulation, five minutes of a busy master's
//! first boot, beside its API server's start. Instead each layer becomes
//! the snapshot containerd's own unpacker would have made, named by its
//! chain ID (where the CRI plugin looks), with the image's directory as
//! its files ([`Client::link_snapshot`]): a few calls, no byte copied.
//! Each image's config is labelled with its top snapshot, so the garbage
//! collector keeps the snapshots while the image is there.
//!
//! The per-image archive holds only the manifest and config, which are
//! written as they are; the compressed layers are not in the image and
//! not in containerd's store (as with the CRI plugin's
//! `discard_unpacked_layers`): nothing reads a layer once its snapshot
//! exists.
//!
//! All of it is said to containerd's API directly ([`crate::containerd`]),
//! as `ctr images import` would say it: the manifest labelled with its
//! config (for the garbage collector), the image named as the archive's
//! index names it, labelled pinned, the whole under a lease until the
//! images reference everything.
//!
use super::{Report, StepError};
use crate::containerd::{CallError, Client, Descriptor};
use crate::contract::{self, ListedImage};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const STEP: &str = "images";
/// containerd's API socket.
pub const SOCKET: &str = "/run/containerd/containerd.sock";
/// containerd's namespace for Kubernetes (the CRI plugin's).
const NAMESPACE: &str = "k8s.io";
/// The label the CRI plugin reports as `pinned`.
const PINNED: (&str, &str) = ("io.cri-containerd.pinned", "pinned");
/// The annotation of an archive's index that names the image.
const IMAGE_NAME: &str = "io.containerd.image.name";
/// The prefix of the content labels the garbage collector follows.
const GC_REF: &str = "containerd.io/gc.ref.content";
/// The lease the import works under.
const LEASE: &str = "slipway-images";
/// The most an archive's entry may hold: they are manifests, configs and
/// an index, kilobytes each.
const ENTRY_LIMIT: u64 = 4 << 20;
/// The snapshotter the CRI plugin uses (containerd's default), the one
/// whose snapshots [`Client::link_snapshot`] can make.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The content label that keeps an image's snapshots from the garbage
/// collector: on its config, naming the top layer's chain ID.
const GC_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.overlayfs";

/// One thing to tell containerd, in the order told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A manifest or config, written with its labels.
    Write {
        digest: String,
        data: Vec<u8>,
        labels: Vec<(String, String)>,
    },
    /// A layer's snapshot, named `chain`, on its parent's (none for the
    /// first): `tree`, the layer unpacked in the image, unless a
    /// snapshot by that name exists.
    Snapshot {
        tree: PathBuf,
        parent: Option<String>,
        chain: String,
    },
    /// An image named, pointed at its manifest, labelled.
    Image {
        name: String,
        target: Descriptor,
        labels: Vec<(String, String)>,
    },
}

/// What an import will tell containerd.
#[derive(Debug)]
pub struct Plan {
    /// The import's calls, in order.
    pub calls: Vec<Call>,
    pub images: usize,
    /// The distinct snapshots the images' layers make.
    pub snapshots: usize,
}

/// Imports every image the list names (archives below `root`), each
/// layer's snapshot made from the image's unpacked copy, and pins it,
/// through containerd's API on `socket`.
pub async fn import(list: &Path, root: &Path, socket: &Path) -> Result<Report, StepError> {
    let start = Instant::now();
    let plan = plan(list, root)?;
    let failed = |e: CallError| StepError::Invalid {
        what: format!("containerd ({})", socket.display()),
        message: e.to_string(),
    };
    let mut client = Client::connect(socket, NAMESPACE).await.map_err(failed)?;
    client.lease(LEASE).await.map_err(failed)?;
    let mut made = 0;
    for call in &plan.calls {
        made += usize::from(perform(&mut client, call).await.map_err(failed)?);
    }
    client.end_lease().await.map_err(failed)?;
    Ok(Report::changed(
        STEP,
        format!(
            "imported and pinned {} images, {made} of their {} layer snapshots made now, in {:.1}s",
            plan.images,
            plan.snapshots,
            start.elapsed().as_secs_f64()
        ),
    ))
}

/// Makes one call; true if it made a snapshot.
async fn perform(client: &mut Client, call: &Call) -> Result<bool, CallError> {
    match call {
        Call::Write {
            digest,
            data,
            labels,
        } => client.write(digest, data, labels).await.map(|_| false),
        Call::Snapshot {
            tree,
            parent,
            chain,
        } => {
            if client.has_snapshot(SNAPSHOTTER, chain).await? {
                return Ok(false);
            }
            client
                .link_snapshot(SNAPSHOTTER, parent.as_deref(), chain, tree)
                .await
                .map(|()| true)
        }
        Call::Image {
            name,
            target,
            labels,
        } => client.put_image(name, target, labels).await.map(|()| false),
    }
}

/// Reads each image's archive: the calls that make containerd hold the
/// images, each config and manifest written once, each image's layer
/// snapshots made (each after its parent, each once) before the image
/// that needs them is named.
pub fn plan(list: &Path, root: &Path) -> Result<Plan, StepError> {
    let entries = read_list(list)?;
    let layers = layers_dir(list);
    let mut plan = Plan {
        calls: Vec::new(),
        images: 0,
        snapshots: 0,
    };
    // What several images share is told once: content and snapshots
    // belong to the namespace, not to an image.
    let mut told = HashSet::new();
    for e in &entries {
        let archive = root.join(e.archive.trim_start_matches('/'));
        let image = read_archive(&archive)?;
        if image.target.digest != e.digest {
            return Err(invalid(
                &archive,
                format!(
                    "holds manifest {}, the list says {}",
                    image.target.digest, e.digest
                ),
            ));
        }
        let listed: Vec<(&str, u64)> = e
            .layers
            .iter()
            .map(|l| (l.digest.as_str(), l.size))
            .collect();
        let in_manifest: Vec<(&str, u64)> = image
            .layers
            .iter()
            .map(|l| (l.digest.as_str(), l.size))
            .collect();
        if listed != in_manifest {
            return Err(invalid(
                &archive,
                format!(
                    "its manifest's layers are not the list's for {}",
                    e.reference
                ),
            ));
        }
        let chains = chain_ids(&image.diff_ids);
        if chains.len() != image.layers.len() {
            return Err(invalid(
                &archive,
                format!(
                    "its config lists {} layers, its manifest {}",
                    chains.len(),
                    image.layers.len()
                ),
            ));
        }
        for (i, layer) in image.layers.iter().enumerate() {
            let hex = hex_of(&layer.digest)
                .ok_or_else(|| invalid(list, format!("layer digest {:?}", layer.digest)))?;
            let tree = layers.join(hex);
            if !tree.is_dir() {
                return Err(invalid(&tree, "is not in the image".into()));
            }
            if told.insert(chains[i].clone()) {
                plan.snapshots += 1;
                plan.calls.push(Call::Snapshot {
                    tree,
                    parent: i.checked_sub(1).map(|p| chains[p].clone()),
                    chain: chains[i].clone(),
                });
            }
        }
        if told.insert(image.config.0.clone()) {
            plan.calls.push(Call::Write {
                digest: image.config.0.clone(),
                data: image.config.1,
                labels: chains
                    .last()
                    .map(|top| (GC_SNAPSHOT.to_owned(), top.clone()))
                    .into_iter()
                    .collect(),
            });
        }
        if told.insert(image.target.digest.clone()) {
            plan.calls.push(Call::Write {
                digest: image.target.digest.clone(),
                data: image.manifest,
                labels: vec![(format!("{GC_REF}.config"), image.config.0.clone())],
            });
        }
        plan.calls.push(Call::Image {
            name: image.name,
            target: image.target,
            labels: vec![(PINNED.0.to_owned(), PINNED.1.to_owned())],
        });
        plan.images += 1;
    }
    Ok(plan)
}

/// Where the layers the list's images use are unpacked: beside the list.
fn layers_dir(list: &Path) -> PathBuf {
    list.parent()
        .unwrap_or(Path::new("/"))
        .join(contract::LAYERS)
}

/// The chain IDs of a stack of layers from their diff IDs: the first
/// layer's is its diff ID, each next one's the digest of its parent's
/// chain ID, a space, and its own diff ID (the OCI image spec's rule;
/// containerd names committed snapshots by them).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let chain = match chains.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        chains.push(chain);
    }
    chains
}

/// One image's archive, read: its name, its manifest (the target), and
/// what the manifest references.
#[derive(Debug)]
struct Archived {
    name: String,
    target: Descriptor,
    manifest: Vec<u8>,
    /// The config's digest and bytes.
    config: (String, Vec<u8>),
    /// The layers, in order.
    layers: Vec<Descriptor>,
    /// The layers' digests uncompressed, in order (the config's).
    diff_ids: Vec<String>,
}

fn read_archive(path: &Path) -> Result<Archived, StepError> {
    let bad = |m: String| invalid(path, m);
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut files = BTreeMap::new();
    let mut tar = tar::Archive::new(file);
    for item in tar.entries().map_err(|e| bad(e.to_string()))? {
        let mut item = item.map_err(|e| bad(e.to_string()))?;
        if !item.header().entry_type().is_file() {
            continue;
        }
        let name = item
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if item.size() > ENTRY_LIMIT {
            return Err(bad(format!(
                "{name} holds {} bytes: an archive here holds no layers",
                item.size()
            )));
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut item, &mut data).map_err(|e| bad(e.to_string()))?;
        files.insert(name.trim_start_matches("./").to_owned(), data);
    }
    let json = |name: &str| -> Result<serde_json::Value, StepError> {
        let data = files.get(name).ok_or_else(|| bad(format!("no {name}")))?;
        serde_json::from_slice(data).map_err(|e| bad(format!("{name}: {e}")))
    };
    // A blob, its bytes checked against its digest.
    let blob = |digest: &str| -> Result<Vec<u8>, StepError> {
        let hex = hex_of(digest).ok_or_else(|| bad(format!("digest {digest:?}")))?;
        let data = files
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| bad(format!("no blob {digest}")))?;
        if hex::encode(sha2::Sha256::digest(data)) != hex {
            return Err(bad(format!("blob {digest} does not hash to its name")));
        }
        Ok(data.clone())
    };
    let index = json("index.json")?;
    let [entry] = index["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        return Err(bad("its index does not name exactly one manifest".into()));
    };
    let name = entry["annotations"][IMAGE_NAME]
        .as_str()
        .ok_or_else(|| bad(format!("its index's manifest has no {IMAGE_NAME}")))?;
    let target = descriptor(entry).ok_or_else(|| bad("its index's manifest entry".into()))?;
    let manifest = blob(&target.digest)?;
    let parsed: serde_json::Value =
        serde_json::from_slice(&manifest).map_err(|e| bad(format!("the manifest: {e}")))?;
    let config =
        descriptor(&parsed["config"]).ok_or_else(|| bad("the manifest's config".into()))?;
    let layers = parsed["layers"]
        .as_array()
        .ok_or_else(|| bad("the manifest lists no layers".into()))?
        .iter()
        .map(descriptor)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("a layer of the manifest".into()))?;
    let config_data = blob(&config.digest)?;
    let parsed: serde_json::Value =
        serde_json::from_slice(&config_data).map_err(|e| bad(format!("the config: {e}")))?;
    let diff_ids = parsed["rootfs"]["diff_ids"]
        .as_array()
        .ok_or_else(|| bad("the config lists no diff_ids".into()))?
        .iter()
        .map(|d| {
            d.as_str()
                .filter(|d| hex_of(d).is_some())
                .map(str::to_owned)
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("a diff_id of the config".into()))?;
    Ok(Archived {
        name: name.to_owned(),
        config: (config.digest.clone(), config_data),
        target,
        manifest,
        layers,
        diff_ids,
    })
}

/// An OCI descriptor's media type, digest and size.
fn descriptor(v: &serde_json::Value) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: v["mediaType"].as_str()?.to_owned(),
        digest: v["digest"].as_str()?.to_owned(),
        size: v["size"].as_u64()?,
    })
}

/// The hex of a `sha256:` digest, if it is one.
fn hex_of(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Copies the file at `path` in the image whose repository is named
/// `repository` (its reference's last path element, e.g. `etcd`) out of
/// its layers into `dest`, executable: the topmost layer that holds it or
/// deletes it (overlayfs's whiteout, a character device) decides. For a
/// program the host runs once from an image it already carries
/// (etcdutl, to restore a backup), with no container runtime involved.
/// `list` is the images' list, the layers unpacked beside it.
pub fn extract(list: &Path, repository: &str, path: &str, dest: &Path) -> Result<(), StepError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let entries = read_list(list)?;
    let entry = entries
        .iter()
        .find(|e| repository_name(&e.reference) == repository)
        .ok_or_else(|| invalid(list, format!("lists no {repository} image")))?;
    let wanted = Path::new(path.trim_start_matches('/'));
    let layers = layers_dir(list);
    for layer in entry.layers.iter().rev() {
        let tree = layers.join(layer.digest.trim_start_matches("sha256:"));
        let at = tree.join(wanted);
        let found = match std::fs::symlink_metadata(&at) {
            Ok(found) => found,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(invalid(&at, e.to_string())),
        };
        if found.file_type().is_char_device() {
            return Err(invalid(
                &tree,
                format!("the {repository} image deletes {path}"),
            ));
        }
        if !found.is_file() {
            return Err(invalid(
                &at,
                format!("{path} in the {repository} image is not a file"),
            ));
        }
        let part = dest.with_extension("part");
        std::fs::copy(&at, &part).map_err(|e| invalid(&at, e.to_string()))?;
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| invalid(&part, e.to_string()))?;
        return std::fs::rename(&part, dest).map_err(|e| invalid(dest, e.to_string()));
    }
    Err(invalid(
        list,
        format!("the {repository} image holds no {path}"),
    ))
}

fn invalid(what: &Path, message: String) -> StepError {
    StepError::Invalid {
        what: what.display().to_string(),
        message,
    }
}

/// The images the image build listed.
fn read_list(list: &Path) -> Result<Vec<ListedImage>, StepError> {
    let text = std::fs::read_to_string(list).map_err(|e| invalid(list, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| invalid(list, e.to_string()))
}

/// The last path element of an image reference's repository:
/// `registry.k8s.io/etcd:3.6.16-0` and `localhost:5000/etcd@sha256:…` are
/// both `etcd`.
fn repository_name(reference: &str) -> &str {
    let named = reference.split('@').next().unwrap_or(reference);
    let last = named.rsplit('/').next().unwrap_or(named);
    last.split(':').next().unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
    }

    /// An image's archive as the builder writes it (index, manifest,
    /// config; no layers) at `path`.
    fn archive(path: &Path, name: &str, layers: &[&str]) -> Archived {
        let config = serde_json::json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|h| format!("sha256:{h}")).collect::<Vec<_>>()}})
        .to_string()
        .into_bytes();
        let layers: Vec<_> = layers
            .iter()
            .map(|h| {
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{h}"), "size": 64})
            })
            .collect();
        let manifest = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
            "layers": layers})
        .to_string()
        .into_bytes();
        let target = Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: sha(&manifest),
            size: manifest.len() as u64,
        };
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": target.media_type, "digest": target.digest, "size": target.size,
            "annotations": {IMAGE_NAME: name}}]});
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |at: String, body: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, at, body).unwrap();
        };
        add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
        add("index.json".into(), index.to_string().as_bytes());
        add(format!("blobs/sha256/{}", &target.digest[7..]), &manifest);
        add(format!("blobs/sha256/{}", &sha(&config)[7..]), &config);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, tar.into_inner().unwrap()).unwrap();
        Archived {
            name: name.into(),
            target,
            manifest,
            config: (sha(&config), config),
            layers: vec![],
            diff_ids: layers
                .iter()
                .map(|l| l["digest"].as_str().unwrap().to_owned())
                .collect(),
        }
    }

    /// An image directory with two images sharing layer A, each layer
    /// unpacked: the list, and each image's manifest descriptor and config.
    fn images(dir: &Path) -> (PathBuf, [Archived; 2]) {
        let images = dir.join(contract::in_tree(contract::IMAGES_DIR));
        for hex in [A, B] {
            let tree = images.join(contract::LAYERS).join(hex);
            std::fs::create_dir_all(&tree).unwrap();
            std::fs::write(tree.join(hex), hex).unwrap();
        }
        let pause = archive(&images.join("a.tar"), "registry.k8s.io/pause:3.10.1", &[A]);
        let etcd = archive(
            &images.join("b.tar"),
            "registry.k8s.io/etcd:3.6.16-0",
            &[A, B],
        );
        let list = images.join("images.json");
        std::fs::write(
            &list,
            format!(
                r#"[{{"archive": "/usr/share/slipway/images/a.tar", "reference": "registry.k8s.io/pause:3.10.1", "digest": "{}",
                     "layers": [{{"digest": "sha256:{A}", "size": 64}}]}},
                    {{"archive": "/usr/share/slipway/images/b.tar", "reference": "registry.k8s.io/etcd:3.6.16-0", "digest": "{}",
                     "layers": [{{"digest": "sha256:{A}", "size": 64}}, {{"digest": "sha256:{B}", "size": 64}}]}}]"#,
                pause.target.digest, etcd.target.digest
            ),
        )
        .unwrap();
        (list, [pause, etcd])
    }

    #[test]
    fn each_snapshot_is_made_once_on_its_parent_before_the_image_that_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let (list, [pause, etcd]) = images(dir.path());
        let plan = plan(&list, dir.path()).unwrap();
        assert_eq!((plan.images, plan.snapshots), (2, 2));
        let (a, b) = (format!("sha256:{A}"), format!("sha256:{B}"));
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a, "a first layer's chain ID is its diff ID");
        assert_eq!(
            chains[1],
            sha(format!("{a} {b}").as_bytes()),
            "the next is its parent's and its own, digested"
        );
        let snapshot = |hex: &str, parent: Option<&String>, chain: &String| Call::Snapshot {
            tree: list.parent().unwrap().join(contract::LAYERS).join(hex),
            parent: parent.cloned(),
            chain: chain.clone(),
        };
        // Labelled with its top snapshot, for the garbage collector.
        let config = |image: &Archived| Call::Write {
            digest: image.config.0.clone(),
            data: image.config.1.clone(),
            labels: vec![(
                GC_SNAPSHOT.to_owned(),
                chain_ids(&image.diff_ids).pop().unwrap(),
            )],
        };
        // Labelled with its config, for the garbage collector.
        let manifest = |image: &Archived| Call::Write {
            digest: image.target.digest.clone(),
            data: image.manifest.clone(),
            labels: vec![(format!("{GC_REF}.config"), image.config.0.clone())],
        };
        let pinned = |image: &Archived| Call::Image {
            name: image.name.clone(),
            target: image.target.clone(),
            labels: vec![("io.cri-containerd.pinned".into(), "pinned".into())],
        };
        assert_eq!(
            plan.calls,
            [
                snapshot(A, None, &chains[0]),
                config(&pause),
                manifest(&pause),
                pinned(&pause),
                // A's snapshot, shared, is made once.
                snapshot(B, Some(&chains[0]), &chains[1]),
                config(&etcd),
                manifest(&etcd),
                pinned(&etcd),
            ]
        );
    }

    #[test]
    fn a_layer_missing_from_the_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (list, _) = images(dir.path());
        std::fs::remove_dir_all(list.parent().unwrap().join(contract::LAYERS).join(B)).unwrap();
        let err = plan(&list, dir.path()).unwrap_err();
        assert!(err.to_string().contains("is not in the image"), "{err}");
    }

    #[test]
    fn an_archive_that_disagrees_with_the_list_or_itself_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (list, _) = images(dir.path());
        let images = dir.path().join(contract::in_tree(contract::IMAGES_DIR));
        let root = dir.path();
        // Another manifest than the list's.
        archive(&images.join("a.tar"), "registry.k8s.io/pause:3.10.1", &[B]);
        let err = plan(&list, root).unwrap_err().to_string();
        assert!(err.contains("a.tar: holds manifest sha256:"), "{err}");
        assert!(err.contains("the list says sha256:"), "{err}");
        // The list's manifest, whose layers the list has otherwise.
        let text = std::fs::read_to_string(&list).unwrap();
        archive(&images.join("a.tar"), "registry.k8s.io/pause:3.10.1", &[A]);
        std::fs::write(
            &list,
            text.replacen(
                &format!(r#""sha256:{A}", "size": 64"#),
                &format!(r#""sha256:{A}", "size": 65"#),
                1,
            ),
        )
        .unwrap();
        let err = plan(&list, root).unwrap_err().to_string();
        assert!(
            err.contains("its manifest's layers are not the list's for registry.k8s.io/pause"),
            "{err}"
        );
        // A blob that does not hash to its name.
        std::fs::write(&list, &text).unwrap();
        let tar_path = images.join("a.tar");
        let bytes = std::fs::read(&tar_path).unwrap();
        let at = bytes.windows(6).position(|w| w == b"amd64\"").unwrap();
        let mut corrupt = bytes.clone();
        corrupt[at] = b'b';
        std::fs::write(&tar_path, corrupt).unwrap();
        let err = plan(&list, root).unwrap_err().to_string();
        assert!(err.contains("does not hash to its name"), "{err}");
    }

    /// A layer unpacked below `dir/layers` holding `files` (an empty
    /// body for a whiteout, a character device 0:0); its digest.
    fn layer(dir: &Path, name: &str, files: &[(&str, Option<&[u8]>)]) -> String {
        let hex = hex::encode(sha2::Sha256::digest(name));
        let tree = dir.join(contract::LAYERS).join(&hex);
        for (path, body) in files {
            let at = tree.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            match body {
                Some(body) => std::fs::write(&at, body).unwrap(),
                None => {
                    let c = std::ffi::CString::new(at.to_str().unwrap()).unwrap();
                    // SAFETY: a NUL-terminated path that outlives the call.
                    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) };
                    assert_eq!(
                        rc,
                        0,
                        "mknod (run as root): {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        format!("sha256:{hex}")
    }

    fn list_of(dir: &Path, reference: &str, layers: &[String]) -> PathBuf {
        let layers: Vec<_> = layers
            .iter()
            .map(|d| serde_json::json!({"digest": d, "size": 1}))
            .collect();
        let list = dir.join("images.json");
        let text = serde_json::json!([{"archive": "/a.tar", "reference": reference,
            "digest": "sha256:00", "layers": layers}]);
        std::fs::write(&list, text.to_string()).unwrap();
        list
    }

    #[test]
    fn a_file_is_taken_from_the_topmost_layer_that_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let bottom = layer(
            dir.path(),
            "bottom",
            &[("usr/local/bin/etcdutl", Some(b"old"))],
        );
        let top = layer(
            dir.path(),
            "top",
            &[
                ("usr/local/bin/etcdutl", Some(b"new")),
                ("etc/x", Some(b"")),
            ],
        );
        let unrelated = layer(dir.path(), "unrelated", &[("etc/y", Some(b""))]);
        let list = list_of(
            dir.path(),
            "localhost:5000/etcd@sha256:00",
            &[bottom.clone(), top, unrelated],
        );
        let dest = dir.path().join("etcdutl");
        extract(&list, "etcd", "/usr/local/bin/etcdutl", &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );

        // Deleted by a later layer (run as root: a whiteout is a device),
        // absent, or no such image: named.
        let whiteout = layer(dir.path(), "whiteout", &[("usr/local/bin/etcdutl", None)]);
        let list = list_of(
            dir.path(),
            "registry.k8s.io/etcd:3.6.16-0",
            &[bottom, whiteout],
        );
        let err = extract(&list, "etcd", "/usr/local/bin/etcdutl", &dest).unwrap_err();
        assert!(err.to_string().contains("deletes"), "{err}");
        let err = extract(&list, "etcd", "/usr/local/bin/etcd", &dest).unwrap_err();
        assert!(
            err.to_string().contains("holds no /usr/local/bin/etcd"),
            "{err}"
        );
        let err = extract(&list, "coredns", "/coredns", &dest).unwrap_err();
        assert!(err.to_string().contains("lists no coredns image"), "{err}");
    }

    #[test]
    fn a_broken_list_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("images.json");
        std::fs::write(&list, "not json").unwrap();
        let err = plan(&list, Path::new("/")).unwrap_err();
        assert!(
            err.to_string().starts_with(&list.display().to_string()),
            "{err}"
        );
    }
}
