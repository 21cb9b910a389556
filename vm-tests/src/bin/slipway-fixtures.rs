//! Test fixtures for the Kubernetes payload, made from binaries built here
//! from source (`vm-tests/fixtures/build-go.sh`):
//!
//! - `slipway-fixtures make BIN_DIR SPEC OUT` lays out an artifact mirror
//!   (`OUT/artifacts/<upstream path>`, tarballs where upstream ships
//!   tarballs), makes an OCI image for every entry of the spec's image list,
//!   pushes them, each tagged through a one-platform index as upstream tags
//!   its images, to Debian's docker-registry (storage in `OUT/registry`) and
//!   writes the pins of all of it to `OUT/payload.lock`;
//! - `slipway-fixtures with-mirrors OUT -- COMMAND…` runs COMMAND with that
//!   registry up and `SLIPWAY_ARTIFACT_MIRROR`, `SLIPWAY_REGISTRY_MIRROR` and
//!   `SLIPWAY_PAYLOAD_LOCK` pointing at the fixtures.
//!
//! Everything it writes is deterministic: same binaries, same digests.

use anyhow::{bail, Context, Result};
use image_builder::cache::Cache;
use image_builder::oci::Reference;
use image_builder::payload::{Lock, LockedArtifact, LockedImage, Mirrors};
use image_builder::spec::Spec;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use vm_tests::push::{self, Pusher};
use vm_tests::registry::Registry;

/// What goes into each fixture image: (path in the image, binary) and the entrypoint.
fn recipe(name: &str) -> Option<(Vec<(&'static str, &'static str)>, &'static str)> {
    Some(match name {
        "pause" => (vec![("/pause", "pause")], "/pause"),
        "etcd" => (
            vec![
                ("/usr/local/bin/etcd", "etcd"),
                ("/usr/local/bin/etcdctl", "etcdctl"),
                ("/usr/local/bin/etcdutl", "etcdutl"),
            ],
            "/usr/local/bin/etcd",
        ),
        "kube-apiserver" => (
            vec![("/usr/local/bin/kube-apiserver", "kube-apiserver")],
            "/usr/local/bin/kube-apiserver",
        ),
        "kube-controller-manager" => (
            vec![(
                "/usr/local/bin/kube-controller-manager",
                "kube-controller-manager",
            )],
            "/usr/local/bin/kube-controller-manager",
        ),
        "kube-scheduler" => (
            vec![("/usr/local/bin/kube-scheduler", "kube-scheduler")],
            "/usr/local/bin/kube-scheduler",
        ),
        "kube-proxy" => (
            vec![("/usr/local/bin/kube-proxy", "kube-proxy")],
            "/usr/local/bin/kube-proxy",
        ),
        "coredns" => (vec![("/coredns", "coredns")], "/coredns"),
        "flannel" => (vec![("/opt/bin/flanneld", "flannel")], "/opt/bin/flanneld"),
        "flannel-cni-plugin" => (vec![("/flannel", "flannel-cni")], "/flannel"),
        _ => return None,
    })
}

/// Images whose programs shell out to iptables (kube-proxy, flanneld) or
/// whose manifests run a shell and `cp` (flannel's). Upstream builds them
/// on a distribution base; the fixtures carry the host's iptables
/// (nf_tables backend, with its extensions and libraries) and a static
/// busybox instead.
fn needs_userland(name: &str) -> bool {
    matches!(name, "kube-proxy" | "flannel")
}

const XTABLES: &str = "/usr/sbin/xtables-nft-multi";
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";
const BUSYBOX: &str = "/bin/busybox";

/// The shared libraries `binary` loads, as absolute paths (from `ldd`).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The userland files (path in the image, content) for [`needs_userland`].
fn userland() -> Result<Vec<(String, Vec<u8>)>> {
    for (path, package) in [(XTABLES, "iptables"), (BUSYBOX, "busybox-static")] {
        if !Path::new(path).exists() {
            bail!("{path} is missing: install the Debian package `{package}` (`just deps`)");
        }
    }
    let mut files = BTreeMap::new();
    let xtables = read(Path::new(XTABLES))?;
    for name in [
        "xtables-nft-multi",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        files.insert(format!("/usr/sbin/{name}"), xtables.clone());
    }
    let mut objects = vec![PathBuf::from(XTABLES)];
    for e in std::fs::read_dir(XTABLES_EXTENSIONS)? {
        let path = e?.path();
        files.insert(path.to_string_lossy().into_owned(), read(&path)?);
        objects.push(path);
    }
    for object in &objects {
        for lib in libraries(object)? {
            if let std::collections::btree_map::Entry::Vacant(e) =
                files.entry(lib.to_string_lossy().into_owned())
            {
                // Follow the soname link: the image gets the library itself.
                e.insert(read(&std::fs::canonicalize(&lib)?)?);
            }
        }
    }
    let busybox = read(Path::new(BUSYBOX))?;
    for name in ["busybox", "sh", "cp", "cat", "ls", "mkdir"] {
        files.insert(format!("/bin/{name}"), busybox.clone());
    }
    Ok(files.into_iter().collect())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn gzip_tar(members: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        tar.append_data(&mut h, path, &data[..])?;
    }
    let raw = tar.into_inner()?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw)?;
    Ok(gz.finish()?)
}

fn make(bins: &Path, spec_path: &Path, out: &Path) -> Result<()> {
    let spec = Spec::load(spec_path)?;
    let spec_dir = spec_path.parent().unwrap_or(Path::new("."));
    let mut lock = Lock::default();

    // Artifacts: single files where upstream ships them, tarballs otherwise.
    let mirrors = Mirrors {
        artifacts: Some(format!("file://{}", out.join("artifacts").display())),
        registry: None,
    };
    // The binaries here are built for the image's architecture only.
    let arch = spec.image.arch.as_str();
    let mut by_url: BTreeMap<String, Vec<&image_builder::spec::Artifact>> = BTreeMap::new();
    for a in &spec.payload.artifacts {
        by_url.entry(a.url_for(arch)).or_default().push(a);
    }
    for (url, arts) in by_url {
        let local = mirrors.artifact_url(&url);
        let path = PathBuf::from(local.trim_start_matches("file://"));
        let bytes = if arts.iter().all(|a| a.extract.is_none()) && arts.len() == 1 {
            let file = arts[0].install.file_name().context("install path")?;
            read(&bins.join(file))?
        } else {
            let mut members = Vec::new();
            for a in &arts {
                let member = a
                    .extract
                    .as_ref()
                    .with_context(|| format!("{url} is shared, so each entry needs `extract`"))?;
                let bin = Path::new(member).file_name().context("member name")?;
                members.push((member.clone(), read(&bins.join(bin))?));
            }
            gzip_tar(&members)?
        };
        std::fs::create_dir_all(path.parent().context("mirror path")?)?;
        std::fs::write(&path, &bytes)?;
        let sha = image_builder::cache::sha256_bytes(&bytes);
        for a in arts {
            lock.artifacts.push(LockedArtifact {
                name: a.name.clone(),
                version: a.version.clone(),
                arch: arch.to_owned(),
                sha256: sha.clone(),
            });
        }
    }

    // Images: made from the binaries, pushed under the upstream repository names.
    let images = match &spec.payload.images {
        Some(p) => image_builder::payload::load_images(&spec_dir.join(p))?,
        None => BTreeMap::new(),
    };
    let registry = Registry::start_with(Some(&out.join("registry")))?;
    let pusher = Pusher::to(&format!("http://{}", registry.host));
    let cache = Cache::at(out.join("cache"));
    for (name, reference) in &images {
        let (files, entry) =
            recipe(name).with_context(|| format!("no fixture recipe for image {name}"))?;
        let mut contents = Vec::new();
        for (dest, bin) in &files {
            contents.push((dest.to_string(), read(&bins.join(bin))?));
        }
        if needs_userland(name) {
            contents.extend(userland()?);
        }
        let layer: Vec<(&str, &[u8], u32)> = contents
            .iter()
            .map(|(d, b)| (d.as_str(), &b[..], 0o755))
            .collect();
        let image = push::image_from_files(&cache, reference, arch, &layer, &[entry])?;
        // Tagged through an index, as upstream publishes, and pinned by it.
        let target: Reference = reference.parse()?;
        let index = pusher.push_indexed(&cache, &target, &image, arch)?;
        eprintln!(
            "pushed {reference} (index {index}, linux/{arch} {})",
            image.manifest.digest
        );
        lock.images.push(LockedImage {
            reference: reference.clone(),
            digest: index,
        });
    }
    std::fs::write(out.join("payload.lock"), lock.to_toml())?;
    eprintln!(
        "fixtures: {} artifacts, {} images, pins in {}",
        lock.artifacts.len(),
        lock.images.len(),
        out.join("payload.lock").display()
    );
    Ok(())
}

fn with_mirrors(out: &Path, command: &[String]) -> Result<()> {
    let lock = out.join("payload.lock");
    if !lock.exists() {
        bail!("{} is missing: run `just fixtures`", lock.display());
    }
    let registry = Registry::start_with(Some(&out.join("registry")))?;
    let (program, args) = command.split_first().context("no command given")?;
    let status = std::process::Command::new(program)
        .args(args)
        .env(
            "SLIPWAY_ARTIFACT_MIRROR",
            format!("file://{}", out.join("artifacts").display()),
        )
        .env(
            "SLIPWAY_REGISTRY_MIRROR",
            format!("http://{}", registry.host),
        )
        .env("SLIPWAY_PAYLOAD_LOCK", &lock)
        .status()
        .with_context(|| format!("running {program}"))?;
    drop(registry);
    if !status.success() {
        bail!("{program} failed ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("make") if args.len() == 4 => make(
            Path::new(&args[1]),
            Path::new(&args[2]),
            Path::new(&args[3]),
        ),
        Some("with-mirrors") if args.len() >= 4 && args[2] == "--" => {
            with_mirrors(Path::new(&args[1]), &args[3..])
        }
        _ => {
            bail!("usage: slipway-fixtures make BIN_DIR SPEC OUT | with-mirrors OUT -- COMMAND...")
        }
    }
}
