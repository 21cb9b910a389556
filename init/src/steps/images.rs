//! The pre-pulled container images, imported into containerd before
//! kubelet starts, so a node never needs a registry for what the image
//! carries; each is labelled pinned so kubelet's image garbage collection
//! never removes it. Importing again is harmless (containerd keeps content
//! by digest), so this runs at every boot.
//!
//! Only the content is imported; containerd unpacks an image into its
//! snapshotter the first time a container uses it. A node never unpacks
//! the control plane's images, and a master unpacks its images while its
//! pods start instead of before kubelet may run.

use super::{Report, Runner, StepError};
use std::path::Path;
use std::time::Instant;

pub const STEP: &str = "images";
/// The list the image build writes next to the archives.
pub const LIST: &str = "/usr/share/slipway/images/images.json";
/// containerd's namespace for Kubernetes (the CRI plugin's).
const NAMESPACE: &str = "k8s.io";
/// The label the CRI plugin reports as `pinned`.
const PINNED: &str = "io.cri-containerd.pinned=pinned";

#[derive(Debug, serde::Deserialize)]
struct Entry {
    archive: String,
    reference: String,
    digest: String,
}

/// Imports every archive the list names (paths below `root`) and pins it.
pub fn import(runner: &dyn Runner, list: &Path, root: &Path) -> Result<Report, StepError> {
    let invalid = |message: String| StepError::Invalid {
        what: list.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(list).map_err(|e| invalid(e.to_string()))?;
    let entries: Vec<Entry> = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let start = Instant::now();
    for e in &entries {
        let archive = root.join(e.archive.trim_start_matches('/'));
        let archive = archive.to_string_lossy();
        runner.run(
            "ctr",
            &[
                "--namespace",
                NAMESPACE,
                "images",
                "import",
                "--no-unpack",
                &archive,
            ],
        )?;
        runner.run(
            "ctr",
            &[
                "--namespace",
                NAMESPACE,
                "images",
                "label",
                &e.reference,
                PINNED,
            ],
        )?;
        tracing::debug!("imported {} ({})", e.reference, e.digest);
    }
    Ok(Report::changed(
        STEP,
        format!(
            "imported and pinned {} images in {:.1}s",
            entries.len(),
            start.elapsed().as_secs_f64()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Default, Clone)]
    struct Record(Arc<Mutex<Vec<String>>>);

    impl Runner for Record {
        fn run(&self, program: &str, args: &[&str]) -> Result<String, StepError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("{program} {}", args.join(" ")));
            Ok(String::new())
        }
    }

    #[test]
    fn every_listed_archive_is_imported_then_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("images.json");
        std::fs::write(
            &list,
            r#"[{"archive": "/usr/share/slipway/images/a.tar", "reference": "registry.k8s.io/pause:3.10.1", "digest": "sha256:00"},
                {"archive": "/usr/share/slipway/images/b.tar", "reference": "registry.k8s.io/etcd:3.6.16-0", "digest": "sha256:11"}]"#,
        )
        .unwrap();
        let runner = Record::default();
        let report = import(&runner, &list, Path::new("/")).unwrap();
        assert!(
            report.detail.starts_with("imported and pinned 2 images"),
            "{report:?}"
        );
        let calls = runner.0.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "ctr --namespace k8s.io images import --no-unpack /usr/share/slipway/images/a.tar",
                "ctr --namespace k8s.io images label registry.k8s.io/pause:3.10.1 io.cri-containerd.pinned=pinned",
                "ctr --namespace k8s.io images import --no-unpack /usr/share/slipway/images/b.tar",
                "ctr --namespace k8s.io images label registry.k8s.io/etcd:3.6.16-0 io.cri-containerd.pinned=pinned",
            ]
        );
    }

    #[test]
    fn a_broken_list_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("images.json");
        std::fs::write(&list, "not json").unwrap();
        let err = import(&Record::default(), &list, Path::new("/")).unwrap_err();
        assert!(
            err.to_string().starts_with(&list.display().to_string()),
            "{err}"
        );
    }
}
