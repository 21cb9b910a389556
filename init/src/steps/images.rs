//! The pre-pulled container images, handed to containerd before kubelet
//! starts, so a node never needs a registry for what the image carries;
//! each is labelled pinned so kubelet's image garbage collection never
//! removes it. Importing again is harmless (containerd keeps content by
//! digest), so this runs at every boot.
//!
//! The image carries every layer once, as a file under
//! `/usr/share/slipway/images/blobs/sha256/`, on the dm-verity-protected
//! root. Copying them into containerd's store would hash and write each
//! byte again (minutes, on a small instance); instead the store's entry
//! for a layer is a symlink to that file, and containerd, which shares
//! content already in its store across namespaces, records the layer in
//! the Kubernetes namespace without reading it. The per-image archive
//! holds only the manifest and config, which makes the image known.
//! containerd unpacks a layer the first time a container uses it, reading
//! through the symlink (and so through dm-verity).

use super::{Report, Runner, StepError};
use crate::contract::{self, ListedImage};
use std::path::Path;
use std::time::Instant;

pub const STEP: &str = "images";
/// containerd's local content store (its root is `/var/lib/containerd`).
pub const CONTENT_STORE: &str = "/var/lib/containerd/io.containerd.content.v1.content";
/// containerd's namespace for Kubernetes (the CRI plugin's).
const NAMESPACE: &str = "k8s.io";
/// The label the CRI plugin reports as `pinned`.
const PINNED: &str = "io.cri-containerd.pinned=pinned";

/// Imports every image the list names (paths below `root`) and pins it;
/// `content` is containerd's content store directory.
pub fn import(
    runner: &dyn Runner,
    list: &Path,
    root: &Path,
    content: &Path,
) -> Result<Report, StepError> {
    let entries = read_list(list)?;
    let images_dir = list.parent().unwrap_or(Path::new("/"));
    let blobs = content.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| invalid(&blobs, e.to_string()))?;
    let start = Instant::now();
    let mut linked = 0;
    // A layer several images share is recorded once: content belongs to
    // the namespace, not to an image.
    let mut recorded = std::collections::HashSet::new();
    for e in &entries {
        let archive = root.join(e.archive.trim_start_matches('/'));
        // Pinned as it is imported: one ctr run (a second of CPU under
        // emulation) per image instead of two.
        ctr(
            runner,
            &[
                "images",
                "import",
                "--no-unpack",
                "--label",
                PINNED,
                &archive.to_string_lossy(),
            ],
            None,
        )?;
        for layer in &e.layers {
            let hex = layer
                .digest
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| invalid(list, format!("layer digest {:?}", layer.digest)))?;
            let file = images_dir.join(contract::BLOBS).join(hex);
            if link(&file, &blobs.join(hex)).map_err(|m| invalid(&blobs.join(hex), m))? {
                linked += 1;
            }
            if !recorded.insert(hex) {
                continue;
            }
            // With the blob in the store this reads nothing: the writer
            // starts at the end and commits. Without it, the file is copied.
            let size = layer.size.to_string();
            ctr(
                runner,
                &[
                    "content",
                    "ingest",
                    "--expected-size",
                    &size,
                    "--expected-digest",
                    &layer.digest,
                    &format!("slipway-{hex}"),
                ],
                Some(&file),
            )?;
        }
        tracing::debug!("imported {} ({})", e.reference, e.digest);
    }
    Ok(Report::changed(
        STEP,
        format!(
            "imported and pinned {} images ({linked} layers newly linked) in {:.1}s",
            entries.len(),
            start.elapsed().as_secs_f64()
        ),
    ))
}

/// Copies the file at `path` in the image whose repository is named
/// `repository` (its reference's last path element, e.g. `etcd`) out of
/// its layers into `dest`, executable: the topmost layer that holds it or
/// deletes it (a whiteout) decides. For a program the host runs once
/// from an image it already carries (etcdutl, to restore a backup), with
/// no container runtime involved. `list` is the images' list, their
/// layers below it in `blobs/sha256/`.
pub fn extract(list: &Path, repository: &str, path: &str, dest: &Path) -> Result<(), StepError> {
    let entries = read_list(list)?;
    let entry = entries
        .iter()
        .find(|e| repository_name(&e.reference) == repository)
        .ok_or_else(|| invalid(list, format!("lists no {repository} image")))?;
    let wanted = Path::new(path.trim_start_matches('/'));
    let whiteout = wanted.with_file_name(format!(
        ".wh.{}",
        wanted.file_name().unwrap_or_default().to_string_lossy()
    ));
    let blobs = list
        .parent()
        .unwrap_or(Path::new("/"))
        .join(contract::BLOBS);
    for layer in entry.layers.iter().rev() {
        let blob = blobs.join(layer.digest.trim_start_matches("sha256:"));
        let file = std::fs::File::open(&blob).map_err(|e| invalid(&blob, e.to_string()))?;
        let mut reader = std::io::BufReader::new(file);
        let gzip = std::io::BufRead::fill_buf(&mut reader)
            .map_err(|e| invalid(&blob, e.to_string()))?
            .starts_with(&[0x1f, 0x8b]);
        let layer_reader: Box<dyn std::io::Read> = if gzip {
            Box::new(flate2::read::GzDecoder::new(reader))
        } else {
            Box::new(reader)
        };
        let mut archive = tar::Archive::new(layer_reader);
        let entries = archive
            .entries()
            .map_err(|e| invalid(&blob, e.to_string()))?;
        for item in entries {
            let mut item = item.map_err(|e| invalid(&blob, e.to_string()))?;
            let at = item
                .path()
                .map_err(|e| invalid(&blob, e.to_string()))?
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect::<std::path::PathBuf>();
            if at == whiteout {
                return Err(invalid(
                    &blob,
                    format!("the {repository} image deletes {path}"),
                ));
            }
            if at == wanted {
                let part = dest.with_extension("part");
                let mut out =
                    std::fs::File::create(&part).map_err(|e| invalid(&part, e.to_string()))?;
                std::io::copy(&mut item, &mut out).map_err(|e| invalid(&part, e.to_string()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| invalid(&part, e.to_string()))?;
                std::fs::rename(&part, dest).map_err(|e| invalid(dest, e.to_string()))?;
                return Ok(());
            }
        }
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

fn ctr(runner: &dyn Runner, args: &[&str], input: Option<&Path>) -> Result<String, StepError> {
    let mut all = vec!["--namespace", NAMESPACE];
    all.extend_from_slice(args);
    runner.run_with_input("ctr", &all, input)
}

/// Points the store's entry at `file` unless the store has the blob
/// already (a file containerd wrote, or a working link); a link left
/// dangling by an older image is replaced. True when it linked.
fn link(file: &Path, entry: &Path) -> Result<bool, String> {
    if std::fs::metadata(entry).is_ok() {
        return Ok(false);
    }
    if std::fs::symlink_metadata(entry).is_ok() {
        std::fs::remove_file(entry).map_err(|e| format!("removing a dangling link: {e}"))?;
    }
    if !file.is_file() {
        return Err(format!("{} is not in the image", file.display()));
    }
    std::os::unix::fs::symlink(file, entry).map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Default, Clone)]
    struct Record(Arc<Mutex<Vec<String>>>);

    impl Runner for Record {
        fn run_with_input(
            &self,
            program: &str,
            args: &[&str],
            input: Option<&Path>,
        ) -> Result<String, StepError> {
            let mut line = format!("{program} {}", args.join(" "));
            if let Some(path) = input {
                line += &format!(" < {}", path.display());
            }
            self.0.lock().unwrap().push(line);
            Ok(String::new())
        }
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// An image directory with two images sharing layer A.
    fn images(dir: &Path) -> PathBuf {
        let images = dir.join(contract::in_tree(contract::IMAGES_DIR));
        std::fs::create_dir_all(images.join("blobs/sha256")).unwrap();
        for hex in [A, B] {
            std::fs::write(images.join("blobs/sha256").join(hex), hex).unwrap();
        }
        let list = images.join("images.json");
        std::fs::write(
            &list,
            format!(
                r#"[{{"archive": "/usr/share/slipway/images/a.tar", "reference": "registry.k8s.io/pause:3.10.1", "digest": "sha256:00",
                     "layers": [{{"digest": "sha256:{A}", "size": 64}}]}},
                    {{"archive": "/usr/share/slipway/images/b.tar", "reference": "registry.k8s.io/etcd:3.6.16-0", "digest": "sha256:11",
                     "layers": [{{"digest": "sha256:{A}", "size": 64}}, {{"digest": "sha256:{B}", "size": 64}}]}}]"#
            ),
        )
        .unwrap();
        list
    }

    #[test]
    fn each_image_is_imported_pinned_and_its_layers_linked_and_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let list = images(dir.path());
        let content = dir
            .path()
            .join("var/lib/containerd/io.containerd.content.v1.content");
        let runner = Record::default();
        let report = import(&runner, &list, dir.path(), &content).unwrap();
        assert!(
            report
                .detail
                .starts_with("imported and pinned 2 images (2 layers newly linked)"),
            "{report:?}"
        );
        let blob = |hex: &str| {
            dir.path()
                .join(contract::in_tree(contract::IMAGES_DIR))
                .join(contract::BLOBS)
                .join(hex)
        };
        for hex in [A, B] {
            let entry = content.join("blobs/sha256").join(hex);
            assert_eq!(std::fs::read_link(&entry).unwrap(), blob(hex));
            assert_eq!(std::fs::read_to_string(&entry).unwrap(), hex);
        }
        let root = dir.path().display();
        let ingest = |hex: &str| {
            format!(
                "ctr --namespace k8s.io content ingest --expected-size 64 --expected-digest sha256:{hex} slipway-{hex} < {}",
                blob(hex).display()
            )
        };
        let calls = runner.0.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                format!("ctr --namespace k8s.io images import --no-unpack --label io.cri-containerd.pinned=pinned {root}/usr/share/slipway/images/a.tar"),
                ingest(A),
                format!("ctr --namespace k8s.io images import --no-unpack --label io.cri-containerd.pinned=pinned {root}/usr/share/slipway/images/b.tar"),
                // A, shared, is recorded once.
                ingest(B),
            ]
        );
    }

    #[test]
    fn blobs_containerd_holds_are_kept_and_dangling_links_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let list = images(dir.path());
        let content = dir.path().join("content");
        let store = content.join("blobs/sha256");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join(A), "written by containerd").unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), store.join(B)).unwrap();
        let report = import(&Record::default(), &list, dir.path(), &content).unwrap();
        assert!(
            report.detail.contains("(1 layers newly linked)"),
            "{report:?}"
        );
        assert_eq!(
            std::fs::read_to_string(store.join(A)).unwrap(),
            "written by containerd"
        );
        assert_eq!(std::fs::read_to_string(store.join(B)).unwrap(), B);
    }

    #[test]
    fn a_layer_missing_from_the_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let list = images(dir.path());
        std::fs::remove_file(
            dir.path()
                .join(contract::in_tree(contract::IMAGES_DIR))
                .join(contract::BLOBS)
                .join(B),
        )
        .unwrap();
        let err = import(&Record::default(), &list, dir.path(), &dir.path().join("c")).unwrap_err();
        assert!(err.to_string().contains("is not in the image"), "{err}");
    }

    /// A gzip'd (or plain) tar layer holding `files`, written as a blob
    /// below `dir`; its digest.
    fn layer(dir: &Path, files: &[(&str, &[u8])], gzip: bool) -> String {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, body) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, path, *body).unwrap();
        }
        let mut bytes = tar.into_inner().unwrap();
        if gzip {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&bytes).unwrap();
            bytes = gz.finish().unwrap();
        }
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(&digest), bytes).unwrap();
        format!("sha256:{digest}")
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
        let bottom = layer(dir.path(), &[("usr/local/bin/etcdutl", &b"old"[..])], true);
        let top = layer(
            dir.path(),
            &[
                ("./usr/local/bin/etcdutl", &b"new"[..]),
                ("etc/x", &b""[..]),
            ],
            false,
        );
        let unrelated = layer(dir.path(), &[("etc/y", &b""[..])], true);
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

        // Deleted by a later layer, absent, or no such image: named.
        let whiteout = layer(dir.path(), &[("usr/local/bin/.wh.etcdutl", &b""[..])], true);
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
        let err = import(&Record::default(), &list, Path::new("/"), dir.path()).unwrap_err();
        assert!(
            err.to_string().starts_with(&list.display().to_string()),
            "{err}"
        );
    }
}
