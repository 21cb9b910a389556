//! `image-builder lock --payload-only --check`, run as a user runs it,
//! against an artifact mirror on disk and a registry on loopback (Debian's
//! docker-registry): every entry is downloaded and compared with its pin,
//! and each one that differs is named with both digests; the lock is left
//! as it was.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use image_builder::cache::Cache;
use std::path::Path;
use std::process::Command;
use vm_tests::push::Pusher;
use vm_tests::registry::Registry;

const SPEC: &str = r#"
[image]
name = "check"
version = "0.1.0"
source_date_epoch = 1767225600

[debian]
suite = "trixie"
packages = ["systemd"]

[kernel]
cmdline = "ro"
initrd_modules = []

[overlay]
units = "units"
manifests = "manifests"
binaries = []

[payload]
images = "images.toml"

[[payload.artifact]]
name = "kubelet"
version = "v1.36.3"
url = "https://dl.k8s.io/release/v1.36.3/bin/linux/{arch}/kubelet"
install = "/usr/bin/kubelet"

[[payload.artifact]]
name = "kubectl"
version = "v1.36.3"
url = "https://dl.k8s.io/release/v1.36.3/bin/linux/amd64/kubectl"
install = "/usr/bin/kubectl"
"#;

struct Site {
    dir: tempfile::TempDir,
    registry: Registry,
    kubelet: String,
    kubectl: String,
    etcd_index: String,
}

/// A spec with two artifacts and one image, their sources, and a lock
/// that pins them to what the sources serve.
fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start().unwrap();
    std::fs::write(dir.path().join("image.toml"), SPEC).unwrap();
    std::fs::write(
        dir.path().join("images.toml"),
        "etcd = \"registry.k8s.io/etcd:3.6.13-0\"\n",
    )
    .unwrap();
    let mut sums = Vec::new();
    for name in ["kubelet", "kubectl"] {
        let path = dir
            .path()
            .join(format!("mirror/release/v1.36.3/bin/linux/amd64/{name}"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body = format!("a {name}");
        std::fs::write(&path, &body).unwrap();
        sums.push(image_builder::cache::sha256_bytes(body.as_bytes()));
    }
    let cache = Cache::at(dir.path().join("push"));
    let image = vm_tests::push::image_from_files(
        &cache,
        "registry.k8s.io/etcd:3.6.13-0",
        "amd64",
        &[("/usr/local/bin/etcd", &b"etcd"[..], 0o755)],
        &["etcd"],
    )
    .unwrap();
    let etcd_index = Pusher::direct()
        .push_indexed(
            &cache,
            &format!("{}/etcd:3.6.13-0", registry.host).parse().unwrap(),
            &image,
            "amd64",
        )
        .unwrap();
    let site = Site {
        dir,
        registry,
        kubelet: sums[0].clone(),
        kubectl: sums[1].clone(),
        etcd_index,
    };
    write_lock(&site, &site.kubelet);
    site
}

fn write_lock(site: &Site, kubelet: &str) {
    let lock = format!(
        "[[artifact]]\nname = \"kubelet\"\nversion = \"v1.36.3\"\narch = \"amd64\"\nsha256 = \"{kubelet}\"\n\n\
         [[artifact]]\nname = \"kubectl\"\nversion = \"v1.36.3\"\narch = \"amd64\"\nsha256 = \"{}\"\n\n\
         [[image]]\nreference = \"registry.k8s.io/etcd:3.6.13-0\"\ndigest = \"{}\"\n",
        site.kubectl, site.etcd_index
    );
    std::fs::write(site.dir.path().join("payload.lock"), lock).unwrap();
}

/// `image-builder lock --payload-only ARGS…` over the site, through its
/// mirrors: whether it succeeded, its stdout and its stderr.
fn lock(site: &Site, args: &[&str]) -> (bool, String, String) {
    let dir = site.dir.path();
    let out = Command::new(env!("CARGO_BIN_EXE_image-builder"))
        .args(["lock", "--payload-only"])
        .args(args)
        .arg("--spec")
        .arg(dir.join("image.toml"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--artifact-mirror")
        .arg(format!("file://{}", dir.join("mirror").display()))
        .arg("--registry-mirror")
        .arg(format!("http://{}", site.registry.host))
        .env_remove("SLIPWAY_PAYLOAD_LOCK")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(site: &Site) -> (bool, String) {
    let (ok, _, stderr) = lock(site, &["--check"]);
    (ok, stderr)
}

fn update(site: &Site, request: &str) -> (bool, String, String) {
    lock(site, &["--update", request])
}

fn lock_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("payload.lock")).unwrap()
}

#[test]
fn a_lock_whose_every_pin_matches_its_source_passes() {
    let site = site();
    let (ok, stderr) = check(&site);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("all 3 payload entries match their source"),
        "{stderr}"
    );
}

#[test]
fn a_source_serving_other_bytes_fails_the_check_naming_the_entry_and_both_digests() {
    let site = site();
    let pinned = "0".repeat(64);
    write_lock(&site, &pinned);
    let before = lock_text(site.dir.path());
    // And the image's tag moved to another index.
    let cache = Cache::at(site.dir.path().join("push"));
    let moved = vm_tests::push::image_from_files(
        &cache,
        "registry.k8s.io/etcd:3.6.13-0",
        "amd64",
        &[("/usr/local/bin/etcd", &b"another etcd"[..], 0o755)],
        &["etcd"],
    )
    .unwrap();
    let moved_index = Pusher::direct()
        .push_indexed(
            &cache,
            &format!("{}/etcd:3.6.13-0", site.registry.host)
                .parse()
                .unwrap(),
            &moved,
            "amd64",
        )
        .unwrap();

    let (ok, stderr) = check(&site);

    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("2 of 3 payload entries differ from their source"),
        "{stderr}"
    );
    let kubelet = stderr
        .lines()
        .find(|l| l.contains("artifact kubelet v1.36.3 amd64:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        kubelet.contains(&format!("gives {}", site.kubelet)),
        "{kubelet}"
    );
    assert!(kubelet.contains(&format!("pinned {pinned}")), "{kubelet}");
    let etcd = stderr
        .lines()
        .find(|l| l.contains("image registry.k8s.io/etcd:3.6.13-0:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(etcd.contains(&format!("gives {moved_index}")), "{etcd}");
    assert!(
        etcd.contains(&format!("pinned {}", site.etcd_index)),
        "{etcd}"
    );
    assert!(
        !stderr.contains("artifact kubectl v1.36.3 amd64:"),
        "{stderr}"
    );
    assert_eq!(
        lock_text(site.dir.path()),
        before,
        "the check changed the lock"
    );
}

#[test]
fn an_unpinned_entry_and_an_unreachable_source_are_listed_too() {
    let site = site();
    std::fs::remove_file(
        site.dir
            .path()
            .join("mirror/release/v1.36.3/bin/linux/amd64/kubectl"),
    )
    .unwrap();
    let lock = lock_text(site.dir.path());
    let without_kubelet = lock.split_once("\n\n").unwrap().1;
    std::fs::write(site.dir.path().join("payload.lock"), without_kubelet).unwrap();

    let (ok, stderr) = check(&site);

    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("artifact kubelet v1.36.3 amd64: no pin"),
        "{stderr}"
    );
    let kubectl = stderr
        .lines()
        .find(|l| l.contains("artifact kubectl v1.36.3 amd64:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(kubectl.contains("No such file"), "{kubectl}");
    assert_eq!(kubectl.matches("kubectl v1.36.3").count(), 1, "{kubectl}");
    assert!(stderr.contains("2 of 3 payload entries differ"), "{stderr}");
}

#[test]
fn an_update_moves_one_entry_prints_both_pins_and_leaves_the_rest() {
    let site = site();
    let dir = site.dir.path();
    let newer = dir.join("mirror/release/v1.36.4/bin/linux/amd64/kubelet");
    std::fs::create_dir_all(newer.parent().unwrap()).unwrap();
    std::fs::write(&newer, "a newer kubelet").unwrap();
    let newer_sha = image_builder::cache::sha256_bytes(b"a newer kubelet");
    let lock_before = lock_text(dir);

    let (ok, stdout, stderr) = update(&site, "kubelet=v1.36.4");

    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "artifact kubelet: v1.36.3 -> v1.36.4\n    amd64 {} -> {newer_sha}\n",
            site.kubelet
        )
    );
    let spec = std::fs::read_to_string(dir.join("image.toml")).unwrap();
    assert_eq!(
        spec,
        SPEC.replacen("version = \"v1.36.3\"", "version = \"v1.36.4\"", 1)
            .replacen(
                "release/v1.36.3/bin/linux/{arch}/kubelet",
                "release/v1.36.4/bin/linux/{arch}/kubelet",
                1
            )
    );
    let lock = image_builder::payload::Lock::load(&dir.join("payload.lock")).unwrap();
    assert_eq!(
        lock.artifact("kubelet", "v1.36.4", "amd64").unwrap().sha256,
        newer_sha
    );
    assert!(lock.artifact("kubelet", "v1.36.3", "amd64").is_none());
    let old: image_builder::payload::Lock = toml::from_str(&lock_before).unwrap();
    assert_eq!(lock.artifacts[1], old.artifacts[1], "kubectl's pin moved");
    assert_eq!(lock.images, old.images, "the image's pin moved");
}

#[test]
fn an_update_whose_release_cannot_be_fetched_changes_no_file() {
    let site = site();
    let dir = site.dir.path();
    let before: Vec<String> = ["image.toml", "images.toml", "payload.lock"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();

    let (ok, _, stderr) = update(&site, "kubelet=v1.99.0");
    assert!(!ok);
    assert!(stderr.contains("kubelet v1.99.0 amd64"), "{stderr}");
    let (ok, _, stderr) = update(&site, "kubelte=v1.36.4");
    assert!(!ok);
    assert!(
        stderr.contains("kubelte names no payload artifact or image"),
        "{stderr}"
    );

    let after: Vec<String> = ["image.toml", "images.toml", "payload.lock"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    assert_eq!(after, before);
}
