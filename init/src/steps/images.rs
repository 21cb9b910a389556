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
use std::path::Path;
use std::time::Instant;

pub const STEP: &str = "images";
/// The list the image build writes next to the archives.
pub const LIST: &str = "/usr/share/slipway/images/images.json";
/// containerd's local content store (its root is `/var/lib/containerd`).
pub const CONTENT_STORE: &str = "/var/lib/containerd/io.containerd.content.v1.content";
/// containerd's namespace for Kubernetes (the CRI plugin's).
const NAMESPACE: &str = "k8s.io";
/// The label the CRI plugin reports as `pinned`.
const PINNED: &str = "io.cri-containerd.pinned=pinned";

#[derive(Debug, serde::Deserialize)]
struct Entry {
    archive: String,
    reference: String,
    digest: String,
    #[serde(default)]
    layers: Vec<Layer>,
}

#[derive(Debug, serde::Deserialize)]
struct Layer {
    digest: String,
    size: u64,
}

/// Imports every image the list names (paths below `root`) and pins it;
/// `content` is containerd's content store directory.
pub fn import(
    runner: &dyn Runner,
    list: &Path,
    root: &Path,
    content: &Path,
) -> Result<Report, StepError> {
    let invalid = |what: &Path, message: String| StepError::Invalid {
        what: what.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(list).map_err(|e| invalid(list, e.to_string()))?;
    let entries: Vec<Entry> =
        serde_json::from_str(&text).map_err(|e| invalid(list, e.to_string()))?;
    let images_dir = list.parent().unwrap_or(Path::new("/"));
    let blobs = content.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| invalid(&blobs, e.to_string()))?;
    let start = Instant::now();
    let mut linked = 0;
    for e in &entries {
        let archive = root.join(e.archive.trim_start_matches('/'));
        ctr(
            runner,
            &[
                "images",
                "import",
                "--no-unpack",
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
            let file = images_dir.join("blobs/sha256").join(hex);
            if link(&file, &blobs.join(hex)).map_err(|m| invalid(&blobs.join(hex), m))? {
                linked += 1;
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
        ctr(runner, &["images", "label", &e.reference, PINNED], None)?;
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
        let images = dir.join("usr/share/slipway/images");
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
    fn each_image_is_imported_its_layers_linked_and_recorded_then_pinned() {
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
                .join("usr/share/slipway/images/blobs/sha256")
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
                format!("ctr --namespace k8s.io images import --no-unpack {root}/usr/share/slipway/images/a.tar"),
                ingest(A),
                "ctr --namespace k8s.io images label registry.k8s.io/pause:3.10.1 io.cri-containerd.pinned=pinned".to_owned(),
                format!("ctr --namespace k8s.io images import --no-unpack {root}/usr/share/slipway/images/b.tar"),
                ingest(A),
                ingest(B),
                "ctr --namespace k8s.io images label registry.k8s.io/etcd:3.6.16-0 io.cri-containerd.pinned=pinned".to_owned(),
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
                .join("usr/share/slipway/images/blobs/sha256")
                .join(B),
        )
        .unwrap();
        let err = import(&Record::default(), &list, dir.path(), &dir.path().join("c")).unwrap_err();
        assert!(err.to_string().contains("is not in the image"), "{err}");
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
