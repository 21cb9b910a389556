//! The payload the repository ships: `payload.lock` pins every entry of the
//! image spec to the value upstream publishes (`pins/upstream.toml`, copied
//! with its sources), and the fixtures build each entry from source at the
//! version the spec names (`vm-tests/fixtures/versions.env`), so a test build
//! and a production build differ only in where the bytes come from.

#![allow(clippy::unwrap_used)] // test glue: a repository file that does not parse should stop the test

use image_builder::payload::{self, Lock};
use image_builder::spec::Spec;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[derive(Debug, Deserialize)]
struct Published {
    artifact: Vec<PublishedArtifact>,
    image: Vec<PublishedImage>,
}

#[derive(Debug, Deserialize)]
struct PublishedArtifact {
    name: String,
    version: String,
    arch: String,
    url: String,
    sha256: String,
}

#[derive(Debug, Deserialize)]
struct PublishedImage {
    name: String,
    tag: String,
    index: String,
}

/// What the repository ships, read from its files.
struct Shipped {
    spec: Spec,
    images: BTreeMap<String, String>,
    lock: Lock,
    published: Published,
}

fn shipped() -> Shipped {
    let spec = Spec::load(&repo().join("image.toml")).unwrap();
    let images = payload::load_images(&repo().join("manifests/images.toml")).unwrap();
    let lock = Lock::load(&repo().join("payload.lock")).unwrap();
    let text = std::fs::read_to_string(repo().join("pins/upstream.toml")).unwrap();
    let published = toml::from_str(&text).unwrap();
    Shipped {
        spec,
        images,
        lock,
        published,
    }
}

/// Every way the lock differs from what upstream publishes for the spec:
/// an entry without a pin, a pin without a published value or not equal to
/// it, and a pin no entry uses.
fn differences(s: &Shipped) -> Vec<String> {
    let mut found = Vec::new();
    for (a, arch) in s.spec.payload.artifacts.iter().flat_map(|a| {
        s.spec
            .pinned_arches()
            .into_iter()
            .map(move |arch| (a, arch))
    }) {
        let what = format!("artifact {} {} {arch}", a.name, a.version);
        let pin = s.lock.artifact(&a.name, &a.version, arch);
        let url = a.url_for(arch);
        let published = s
            .published
            .artifact
            .iter()
            .find(|p| p.url == url && p.arch == arch);
        match (pin, published) {
            (None, _) => found.push(format!("{what} has no pin")),
            (_, None) => found.push(format!("{what}: nothing published for {url}")),
            (Some(pin), Some(p)) if pin.sha256 != p.sha256 => found.push(format!(
                "{what}: pinned {}, published {} ({} {})",
                pin.sha256, p.sha256, p.name, p.version
            )),
            _ => {}
        }
    }
    for reference in s.images.values() {
        let pin = s.lock.images.iter().find(|p| &p.reference == reference);
        let published = reference.rsplit_once(':').and_then(|(name, tag)| {
            s.published
                .image
                .iter()
                .find(|p| p.name == name && p.tag == tag)
        });
        match (pin, published) {
            (None, _) => found.push(format!("image {reference} has no pin")),
            (_, None) => found.push(format!("image {reference}: nothing published")),
            (Some(pin), Some(p)) if pin.digest != p.index => found.push(format!(
                "image {reference}: pinned {}, published index {}",
                pin.digest, p.index
            )),
            _ => {}
        }
    }
    for pin in &s.lock.artifacts {
        let used = s.spec.pinned_arches().contains(&pin.arch.as_str())
            && s.spec
                .payload
                .artifacts
                .iter()
                .any(|a| a.name == pin.name && a.version == pin.version);
        if !used {
            found.push(format!(
                "pin for artifact {} {} {} is not in the spec",
                pin.name, pin.version, pin.arch
            ));
        }
    }
    for pin in &s.lock.images {
        if !s.images.values().any(|r| r == &pin.reference) {
            found.push(format!(
                "pin for image {} is not in the image list",
                pin.reference
            ));
        }
    }
    found
}

#[test]
fn every_shipped_pin_is_the_published_one() {
    let s = shipped();
    assert_eq!(s.spec.pinned_arches(), ["amd64", "arm64"]);
    let found = differences(&s);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn a_changed_or_missing_pin_is_found() {
    let mut s = shipped();
    s.lock.artifacts[0].sha256 = "0".repeat(64);
    let kubelet = s.lock.artifacts[0].name.clone();
    let image = s.lock.images.pop().unwrap();
    let found = differences(&s);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with(&format!("artifact {kubelet} ")),
        "{found:#?}"
    );
    assert!(found[0].contains(&"0".repeat(64)), "{found:#?}");
    assert_eq!(found[1], format!("image {} has no pin", image.reference));
}

/// `vm-tests/fixtures/versions.env`: the versions the fixtures build.
fn fixture_versions() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo().join("vm-tests/fixtures/versions.env")).unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The fixture version an entry of the payload is built at, and the version
/// the spec should name for it; `None` for an entry whose fixture is a
/// stand-in of another version (said in the README).
fn fixture_for(name: &str) -> Option<&'static str> {
    Some(match name {
        "kubelet"
        | "kubectl"
        | "kube-apiserver"
        | "kube-controller-manager"
        | "kube-scheduler"
        | "kube-proxy" => "K8S_VERSION",
        "containerd" | "containerd-shim-runc-v2" | "ctr" => "CONTAINERD_VERSION",
        "crictl" => "CRICTL_VERSION",
        "etcd" => "ETCD_VERSION",
        "coredns" => "COREDNS_VERSION",
        "flannel" => "FLANNEL_VERSION",
        "pause" => "PAUSE_VERSION",
        n if n.starts_with("cni-") => "CNI_PLUGINS_VERSION",
        _ => return None,
    })
}

/// Stand-ins: the fixture builds something else under this name.
const STAND_INS: &[&str] = &["flannel-cni-plugin"];

/// A version as both sides write it: without the leading `v`, and an image
/// tag without its image revision (etcd's `3.6.13-0` is etcd v3.6.13).
fn bare(version: &str) -> &str {
    let version = version.strip_suffix("-0").unwrap_or(version);
    version.strip_prefix('v').unwrap_or(version)
}

#[test]
fn every_shipped_entry_has_a_fixture_at_its_version() {
    let s = shipped();
    let fixtures = fixture_versions();
    let mut entries: Vec<(String, String)> = s
        .spec
        .payload
        .artifacts
        .iter()
        .map(|a| (a.name.clone(), a.version.clone()))
        .collect();
    for (name, reference) in &s.images {
        let (_, tag) = reference.rsplit_once(':').unwrap();
        entries.push((name.clone(), tag.to_owned()));
    }
    let mut wrong = Vec::new();
    for (name, version) in entries {
        if STAND_INS.contains(&name.as_str()) {
            continue;
        }
        match fixture_for(&name).and_then(|var| fixtures.get(var).map(|v| (var, v))) {
            None => wrong.push(format!("{name}: no fixture builds it")),
            Some((var, v)) if bare(v) != bare(&version) => {
                wrong.push(format!("{name}: spec {version}, fixtures {var}={v}"));
            }
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The CNI plugins the network's configuration names (flannel's, which
/// delegates to the bridge and host-local plugins; containerd adds
/// loopback) are all on the read-only root, where containerd looks first:
/// none is left to a container to copy at boot.
#[test]
fn every_cni_plugin_the_network_uses_is_in_the_image() {
    let s = shipped();
    let manifest =
        std::fs::read_to_string(repo().join("manifests/addons/30-flannel.yaml")).unwrap();
    let (_, conf) = manifest.split_once("cni-conf.json: |").unwrap();
    let (conf, _) = conf.split_once("net-conf.json").unwrap();
    let mut wanted: Vec<String> = conf
        .split("\"type\":")
        .skip(1)
        .map(|rest| {
            rest.trim_start()
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(wanted.contains(&"flannel".to_owned()), "{conf}");
    wanted.extend(["bridge", "host-local", "loopback"].map(String::from));
    let installed: Vec<&Path> = s
        .spec
        .payload
        .artifacts
        .iter()
        .map(|a| a.install.as_path())
        .chain(
            s.spec
                .payload
                .image_files
                .iter()
                .map(|f| f.install.as_path()),
        )
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|t| !installed.contains(&Path::new("/usr/lib/cni").join(t).as_path()))
        .collect();
    assert!(missing.is_empty(), "not in /usr/lib/cni: {missing:?}");
    // Each file taken out of an image names an image the build pulls.
    for f in &s.spec.payload.image_files {
        assert!(s.images.contains_key(&f.image), "{}", f.image);
    }
}
