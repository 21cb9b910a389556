//! The pre-pulled images' import against a real containerd (the payload's
//! own build, from the fixtures) running on the host with its own root,
//! state and socket: what the kubelet sees through the CRI afterwards is
//! the judge, not what the import says it did.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use sha2::{Digest, Sha256};
use slipway_init::steps::images;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// containerd on the host, stopped when dropped.
struct Containerd {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        let root = dir.join("root");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 3\nroot = {:?}\nstate = {:?}\n[grpc]\naddress = {:?}\n\
                 [ttrpc]\naddress = \"{}.ttrpc\"\n",
                root,
                dir.join("state"),
                socket,
                socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let program = vm_tests::fixtures_bin("containerd");
        assert!(
            program.exists(),
            "{} is missing: build the payload first (`just check` and `just fixtures` do)",
            program.display()
        );
        let child = Command::new(program)
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "containerd did not serve {} within 30s: {}",
                socket.display(),
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Containerd {
            child,
            socket,
            root,
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(vm_tests::fixtures_bin(program))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The images as the kubelet sees them: `crictl images`' JSON.
    fn cri_images(&self) -> serde_json::Value {
        let endpoint = format!("unix://{}", self.socket.display());
        let out = self.run(
            "crictl",
            &["--runtime-endpoint", &endpoint, "images", "-o", "json"],
        );
        serde_json::from_str(&out).unwrap()
    }

    fn ctr(&self, args: &[&str]) -> String {
        let address = self.socket.to_string_lossy().into_owned();
        let mut all = vec!["--address", address.as_str(), "--namespace", "k8s.io"];
        all.extend_from_slice(args);
        self.run("ctr", &all)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, path, *body).unwrap();
    }
    tar.into_inner().unwrap()
}

/// An image tree as the builder lays it out below `root`: one image named
/// `name` with two layers (`etc/hello`, then `etc/world` on it), each
/// unpacked in the images' directory, its archive (index, manifest,
/// config) and the list. The list's path and the layers' digests.
fn image_tree(root: &Path, name: &str) -> (PathBuf, [String; 2]) {
    let images = root.join("usr/share/slipway/images");
    let files: [(&str, &[u8]); 2] = [("etc/hello", b"hello\n"), ("etc/world", b"world\n")];
    let layers = files.map(|file| tar_of(&[file]));
    let digests = layers.clone().map(|l| sha(&l));
    for ((path, body), digest) in files.iter().zip(&digests) {
        let at = images.join("layers").join(&digest[7..]).join(path);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, body).unwrap();
    }
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": digests}})
    .to_string();
    let descriptors: Vec<_> = layers
        .iter()
        .zip(&digests)
        .map(|(layer, digest)| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest, "size": layer.len()})
        })
        .collect();
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config.as_bytes()), "size": config.len()},
        "layers": descriptors})
    .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(manifest.as_bytes()), "size": manifest.len(),
        "annotations": {"io.containerd.image.name": name}}]})
    .to_string();
    let archive = tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json", index.as_bytes()),
        (
            &format!("blobs/sha256/{}", &sha(manifest.as_bytes())[7..]),
            manifest.as_bytes(),
        ),
        (
            &format!("blobs/sha256/{}", &sha(config.as_bytes())[7..]),
            config.as_bytes(),
        ),
    ]);
    std::fs::write(images.join("hello.tar"), archive).unwrap();
    let list = images.join("images.json");
    let listed: Vec<_> = layers
        .iter()
        .zip(&digests)
        .map(|(layer, digest)| serde_json::json!({"digest": digest, "size": layer.len()}))
        .collect();
    let entry = serde_json::json!([{"archive": "/usr/share/slipway/images/hello.tar",
        "digest": sha(manifest.as_bytes()), "reference": name, "layers": listed}]);
    std::fs::write(&list, entry.to_string()).unwrap();
    (list, digests)
}

/// The CRI's view of `name`, waited for: the CRI plugin learns of images
/// from containerd's events, a moment after they are made.
fn seen_by_cri(containerd: &Containerd, name: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let all = containerd.cri_images();
        let found = all["images"].as_array().and_then(|images| {
            images
                .iter()
                .find(|i| {
                    i["repoTags"]
                        .as_array()
                        .is_some_and(|t| t.iter().any(|t| t == name))
                })
                .cloned()
        });
        if let Some(image) = found {
            return image;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the CRI does not list {name}: {all}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
async fn imported_images_are_the_kubelets_pinned_images_their_snapshots_the_images_trees_and_a_second_import_changes_nothing(
) {
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(dir.path());
    let tree = dir.path().join("tree");
    let name = "registry.k8s.io/hello:1.0";
    let (list, [first, second]) = image_tree(&tree, name);
    let layers = tree.join("usr/share/slipway/images/layers");

    let import = || async {
        images::import(&list, &tree, &containerd.socket)
            .await
            .unwrap()
            .detail
    };
    let imported = import().await;
    assert!(
        imported.starts_with("imported and pinned 1 images, 2 of their 2 layer snapshots made now"),
        "{imported}"
    );
    let image = seen_by_cri(&containerd, name);
    assert_eq!(image["pinned"], true, "{image}");

    // Each layer a committed snapshot named by its chain ID, on its
    // parent, as containerd's own unpacker would have made it, the top
    // one kept for the collector by the image's config; its files the
    // image's tree, linked, not copied.
    let chains = images::chain_ids(&[first.clone(), second.clone()]);
    let snapshots = containerd.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    let row = |key: &str| {
        snapshots
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
    };
    assert_eq!(
        row(&chains[0]),
        Some(vec![chains[0].as_str(), "Committed"]),
        "{snapshots}"
    );
    assert_eq!(
        row(&chains[1]),
        Some(vec![chains[1].as_str(), chains[0].as_str(), "Committed"]),
        "{snapshots}"
    );
    assert_eq!(snapshots.lines().count(), 3, "nothing else: {snapshots}");
    let content = containerd.ctr(&["content", "ls"]);
    assert!(
        content.contains(&format!(
            "containerd.io/gc.ref.snapshot.overlayfs={}",
            chains[1]
        )),
        "{content}"
    );
    assert!(
        !content.contains(&first[7..]) && !content.contains(&second[7..]),
        "the compressed layers are nowhere: {content}"
    );
    let snapshot_dirs = containerd
        .root
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let mut linked: Vec<PathBuf> = std::fs::read_dir(&snapshot_dirs)
        .unwrap()
        .map(|s| std::fs::read_link(s.unwrap().path().join("fs")).unwrap())
        .collect();
    linked.sort();
    let mut trees = vec![layers.join(&first[7..]), layers.join(&second[7..])];
    trees.sort();
    assert_eq!(linked, trees);

    // A container's root on the top snapshot, mounted as the runtime
    // mounts it (overlayfs, through the links), sees both layers; what it
    // writes stays in its own upper directory.
    containerd.ctr(&["snapshots", "prepare", "a-container", &chains[1]]);
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let mount = containerd.ctr(&[
        "snapshots",
        "mounts",
        rootfs.to_str().unwrap(),
        "a-container",
    ]);
    let status = Command::new("sh")
        .arg("-c")
        .arg(mount.trim())
        .status()
        .unwrap();
    assert!(status.success(), "{mount}");
    let read = std::fs::read_to_string(rootfs.join("etc/hello")).and_then(|hello| {
        std::fs::write(rootfs.join("etc/world"), "changed\n")?;
        Ok(hello + &std::fs::read_to_string(rootfs.join("etc/world"))?)
    });
    let unmounted = Command::new("umount").arg(&rootfs).status().unwrap();
    assert_eq!(read.unwrap(), "hello\nchanged\n");
    assert!(unmounted.success());
    assert_eq!(
        std::fs::read_to_string(layers.join(&second[7..]).join("etc/world")).unwrap(),
        "world\n"
    );
    containerd.ctr(&["snapshots", "rm", "a-container"]);

    // Again, as at every boot: nothing new, still pinned, and the CRI
    // plugin's own label on the image kept.
    let imported = import().await;
    assert!(
        imported.starts_with("imported and pinned 1 images, 0 of their 2 layer snapshots made now"),
        "{imported}"
    );
    assert_eq!(seen_by_cri(&containerd, name)["pinned"], true);
    let listed = containerd.ctr(&["images", "ls"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_default();
    assert!(line.contains("io.cri-containerd.pinned=pinned"), "{listed}");
    assert!(line.contains("io.cri-containerd.image=managed"), "{listed}");
    // The import's lease is gone: what it wrote is held by the image.
    assert_eq!(containerd.ctr(&["leases", "ls", "-q"]).trim(), "");
}

#[tokio::test]
async fn a_containerd_that_does_not_answer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let (list, _) = image_tree(&tree, "registry.k8s.io/hello:1.0");
    let socket = dir.path().join("nobody.sock");
    let err = images::import(&list, &tree, &socket)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nobody.sock"), "{err}");
}
