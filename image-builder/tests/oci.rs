//! The OCI client against a real registry (Debian's docker-registry on
//! loopback, one per test): push, then pull by tag through a multi-arch
//! index and by digest, with every blob checked; a tampered blob, an
//! unreachable registry and a mirror.

#![allow(clippy::unwrap_used)] // test glue: a failed setup should stop the test

use image_builder::cache::Cache;
use image_builder::fetch;
use image_builder::oci::{self, Client, Descriptor, Mirror, OciError, Pulled, Reference};
use vm_tests::push::Pusher;
use vm_tests::registry::Registry;

fn push_multiarch(
    reg: &Registry,
    cache: &Cache,
    repo: &str,
    tag: &str,
) -> (Pulled, Pulled, String) {
    let pusher = Pusher::direct();
    let mut children = Vec::new();
    for (arch, content) in [
        ("amd64", &b"etcd for amd64"[..]),
        ("arm64", &b"etcd for arm64"[..]),
    ] {
        let name = format!("{}/{repo}:{tag}-{arch}", reg.host);
        let img = vm_tests::push::image_from_files(
            cache,
            &name,
            arch,
            &[("/usr/local/bin/etcd", content, 0o755)],
            &["etcd"],
        )
        .unwrap();
        pusher.push(cache, &name.parse().unwrap(), &img).unwrap();
        children.push((arch, img));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": children.iter().map(|(arch, img)| serde_json::json!({
            "mediaType": oci::OCI_MANIFEST,
            "digest": img.manifest.digest,
            "size": img.manifest.size,
            "platform": {"os": "linux", "architecture": arch},
        })).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    );
    let name = format!("{}/{repo}:{tag}", reg.host);
    oci::store(cache, &bytes, &digest, &name).unwrap();
    let index_image = Pulled {
        reference: name.clone(),
        manifest: Descriptor {
            media_type: oci::OCI_INDEX.into(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            annotations: None,
        },
        index_digest: None,
        blobs: vec![],
    };
    pusher
        .push(cache, &name.parse().unwrap(), &index_image)
        .unwrap();
    let mut it = children.into_iter().map(|(_, i)| i);
    (it.next().unwrap(), it.next().unwrap(), digest)
}

fn cached(cache: &Cache, d: &Descriptor) -> bool {
    let path = fetch::blob_path(cache, d.digest.trim_start_matches("sha256:"));
    path.exists()
        && format!(
            "sha256:{}",
            image_builder::cache::sha256_file(&path).unwrap()
        ) == d.digest
}

#[test]
fn a_multiarch_tag_resolves_to_the_platform_and_a_digest_pull_matches() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (amd64, _arm64, index) =
        push_multiarch(&reg, &Cache::at(dir.path().join("push")), "etcd", "v3.6.16");

    let cache = Cache::at(dir.path().join("pull"));
    let client = Client::new(None);
    let by_tag = client
        .pull(
            &cache,
            &format!("{}/etcd:v3.6.16", reg.host).parse().unwrap(),
            "amd64",
        )
        .unwrap();
    assert_eq!(by_tag.manifest.digest, amd64.manifest.digest);
    assert_eq!(by_tag.index_digest.as_deref(), Some(index.as_str()));
    assert_eq!(by_tag.blobs, amd64.blobs);
    assert!(by_tag.blobs.iter().all(|b| cached(&cache, b)));

    let pinned: Reference = format!("{}/etcd:v3.6.16@{}", reg.host, amd64.manifest.digest)
        .parse()
        .unwrap();
    let by_digest = client
        .pull(&Cache::at(dir.path().join("pull2")), &pinned, "amd64")
        .unwrap();
    assert_eq!(by_digest.manifest, by_tag.manifest);

    // No such platform.
    let err = client
        .pull(
            &cache,
            &format!("{}/etcd:v3.6.16", reg.host).parse().unwrap(),
            "riscv64",
        )
        .unwrap_err();
    assert!(err.to_string().contains("no linux/riscv64 image"), "{err}");
}

#[test]
fn an_image_pushed_with_its_index_is_found_again_through_the_index_digest() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let push_cache = Cache::at(dir.path().join("push"));
    let name = format!("{}/coredns/coredns:v1.14.3", reg.host);
    let img = vm_tests::push::image_from_files(
        &push_cache,
        &name,
        "amd64",
        &[("/coredns", &b"coredns"[..], 0o755)],
        &["/coredns"],
    )
    .unwrap();
    let index = Pusher::direct()
        .push_indexed(&push_cache, &name.parse().unwrap(), &img, "amd64")
        .unwrap();
    assert_ne!(index, img.manifest.digest);

    // Pinned by the index, as upstream publishes its images.
    let cache = Cache::at(dir.path().join("pull"));
    let pinned: Reference = format!("{name}@{index}").parse().unwrap();
    let pulled = Client::new(None).pull(&cache, &pinned, "amd64").unwrap();
    assert_eq!(pulled.manifest.digest, img.manifest.digest);
    assert_eq!(pulled.index_digest.as_deref(), Some(index.as_str()));

    // A later build finds the platform's image in its cache from the index.
    let again = Pulled::cached(&cache, &name, &index, "amd64")
        .unwrap()
        .unwrap();
    assert_eq!(again.manifest.digest, img.manifest.digest);
    assert_eq!(again.index_digest.as_deref(), Some(index.as_str()));
    assert_eq!(again.blobs, img.blobs);
    let err = Pulled::cached(&cache, &name, &index, "arm64").unwrap_err();
    assert!(err.to_string().contains("no linux/arm64 image"), "{err}");
}

#[test]
fn a_tampered_blob_is_refused_and_not_cached() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (amd64, _, _) = push_multiarch(
        &reg,
        &Cache::at(dir.path().join("push")),
        "kube-apiserver",
        "v1.37.2",
    );
    let layer = &amd64.blobs[1];
    let file = reg.blob_file(&layer.digest);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 600;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let cache = Cache::at(dir.path().join("pull"));
    let reference: Reference = format!("{}/kube-apiserver:v1.37.2", reg.host)
        .parse()
        .unwrap();
    let err = Client::new(None)
        .pull(&cache, &reference, "amd64")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, OciError::Blob(fetch::FetchError::Digest { .. }, _)),
        "{msg}"
    );
    assert!(
        msg.contains(&reference.to_string()) && msg.contains(&layer.digest),
        "{msg}"
    );
    assert!(!cached(&cache, layer));
}

#[test]
fn an_unreachable_registry_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let reference: Reference = format!("127.0.0.1:{port}/etcd:v1").parse().unwrap();
    let err = Client::new(None)
        .pull(&Cache::at(dir.path().to_owned()), &reference, "amd64")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("registry http://127.0.0.1:{port}:")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("connect"), "{msg}");
}

#[test]
fn a_mirror_serves_images_under_their_upstream_names() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (amd64, _, _) = push_multiarch(
        &reg,
        &Cache::at(dir.path().join("push")),
        "coredns/coredns",
        "v1.15.0",
    );
    let client = Client::new(Some(Mirror {
        base: format!("http://{}", reg.host),
    }));
    let cache = Cache::at(dir.path().join("pull"));
    let pulled = client
        .pull(
            &cache,
            &"registry.k8s.io/coredns/coredns:v1.15.0".parse().unwrap(),
            "amd64",
        )
        .unwrap();
    assert_eq!(pulled.reference, "registry.k8s.io/coredns/coredns:v1.15.0");
    assert_eq!(pulled.manifest.digest, amd64.manifest.digest);
    let archive = dir.path().join("coredns.tar");
    oci::write_archive(&cache, &pulled, &archive, oci::Layers::Included).unwrap();
    assert!(std::fs::metadata(&archive).unwrap().len() > 0);
}

#[test]
fn the_lock_refresh_pins_artifacts_and_images_from_their_sources() {
    use image_builder::payload::{self, Lock, Mirrors};
    use image_builder::spec::Artifact;
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, _, index) = push_multiarch(
        &reg,
        &Cache::at(dir.path().join("push")),
        "etcd",
        "3.6.16-0",
    );
    // An artifact mirror with upstream's layout, and its published checksum.
    let mirror = dir.path().join("mirror");
    let bin = mirror.join("release/v1.37.2/bin/linux/amd64/kubelet");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, b"a kubelet").unwrap();
    let sha = image_builder::cache::sha256_bytes(b"a kubelet");
    std::fs::write(bin.with_extension("sha256"), format!("{sha}\n")).unwrap();
    let artifacts = vec![Artifact {
        name: "kubelet".into(),
        version: "v1.37.2".into(),
        url: "https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubelet".into(),
        install: "/usr/bin/kubelet".into(),
        extract: None,
        mode: 0o755,
    }];
    let images = std::collections::BTreeMap::from([(
        "etcd".to_owned(),
        "registry.k8s.io/etcd:3.6.16-0".to_owned(),
    )]);
    let mirrors = Mirrors {
        artifacts: Some(format!("file://{}", mirror.display())),
        registry: Some(format!("http://{}", reg.host)),
    };
    let cache = Cache::at(dir.path().join("cache"));
    let lock = payload::refresh(
        &cache,
        &artifacts,
        &images,
        &Lock::default(),
        &mirrors,
        &["amd64"],
        &|_| {},
    )
    .unwrap();
    assert_eq!(lock.artifacts[0].sha256, sha);
    // The image by the index its tag names, as upstream publishes it.
    assert_eq!(lock.images[0].digest, index);

    // Existing pins are kept as they are.
    let again = payload::refresh(
        &cache,
        &artifacts,
        &images,
        &lock,
        &Mirrors::default(),
        &["amd64"],
        &|_| {},
    )
    .unwrap();
    assert_eq!(again, lock);

    // A download that disagrees with upstream's published checksum is refused.
    std::fs::write(
        bin.with_extension("sha256"),
        format!("{}\n", "0".repeat(64)),
    )
    .unwrap();
    let err = payload::refresh(
        &cache,
        &artifacts,
        &images,
        &Lock::default(),
        &mirrors,
        &["amd64"],
        &|_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("kubelet v1.37.2") && err.to_string().contains(&"0".repeat(64)),
        "{err}"
    );
}

/// A stand-in for a registry's token service, in front of the real
/// registry: anything without the bearer token gets a 401 challenge that
/// names this server's /token realm; with it, requests are passed through.
/// (Debian's registry needs signing certificates for real token auth; the
/// client's side of the exchange is what is tested here.)
fn token_front(upstream: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let tokens = std::sync::Arc::new(AtomicUsize::new(0));
    let (front, issued) = (host.clone(), tokens.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let (mut auth, mut accept) = (String::new(), String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap_or(("", ""));
                match k.to_ascii_lowercase().as_str() {
                    "authorization" => auth = v.trim().to_owned(),
                    "accept" => accept = v.trim().to_owned(),
                    _ => {}
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let (status, ctype, body, extra) = if path.starts_with("/token") {
                issued.fetch_add(1, Ordering::SeqCst);
                (
                    "200 OK".to_owned(),
                    "application/json".to_owned(),
                    br#"{"token":"t0k"}"#.to_vec(),
                    String::new(),
                )
            } else if auth != "Bearer t0k" {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"http://{front}/token\",service=\"stand-in\",scope=\"repository:etcd:pull\"\r\n"
                );
                (
                    "401 Unauthorized".to_owned(),
                    "application/json".to_owned(),
                    b"{}".to_vec(),
                    challenge,
                )
            } else {
                let mut req = ureq::get(&format!("http://{upstream}{path}"));
                if !accept.is_empty() {
                    req = req.set("Accept", &accept);
                }
                match req.call() {
                    Ok(resp) => {
                        let ctype = resp.content_type().to_owned();
                        let mut body = Vec::new();
                        resp.into_reader().read_to_end(&mut body).unwrap();
                        ("200 OK".to_owned(), ctype, body, String::new())
                    }
                    Err(_) => (
                        "404 Not Found".to_owned(),
                        "text/plain".to_owned(),
                        Vec::new(),
                        String::new(),
                    ),
                }
            };
            let mut out = stream;
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                body.len()
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(&body);
        }
    });
    (host, tokens)
}

#[test]
fn bearer_token_auth_through_a_stand_in_token_service() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (amd64, _, _) =
        push_multiarch(&reg, &Cache::at(dir.path().join("push")), "etcd", "v3.6.16");
    let (front, tokens) = token_front(reg.host.clone());
    let client = Client::new(Some(Mirror {
        base: format!("http://{front}"),
    }));
    let pulled = client
        .pull(
            &Cache::at(dir.path().join("pull")),
            &"registry.k8s.io/etcd:v3.6.16".parse().unwrap(),
            "amd64",
        )
        .unwrap();
    assert_eq!(pulled.manifest.digest, amd64.manifest.digest);
    // One token, reused for the index, the manifest and both blobs.
    assert_eq!(tokens.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn two_tags_of_the_same_bytes_go_into_the_image_under_their_own_names() {
    use image_builder::payload::{self, Inputs, Lock, LockedImage, Mirrors};
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let push_cache = Cache::at(dir.path().join("push"));
    let pusher = Pusher::direct();
    let img = vm_tests::push::image_from_files(
        &push_cache,
        "ghcr.io/flannel-io/flannel-cni-plugin:v1",
        "amd64",
        &[("/flannel", &b"the same plugin"[..], 0o755)],
        &["/flannel"],
    )
    .unwrap();
    let mut lock = Lock::default();
    let mut images = std::collections::BTreeMap::new();
    for tag in ["v1.8.0-flannel1", "v1.9.1-flannel1"] {
        let target = format!("{}/flannel-io/flannel-cni-plugin:{tag}", reg.host);
        let index = pusher
            .push_indexed(&push_cache, &target.parse().unwrap(), &img, "amd64")
            .unwrap();
        let reference = format!("ghcr.io/flannel-io/flannel-cni-plugin:{tag}");
        images.insert(tag.to_owned(), reference.clone());
        lock.images.push(LockedImage {
            reference,
            digest: index,
        });
    }
    assert_eq!(lock.images[0].digest, lock.images[1].digest);
    let mirrors = Mirrors {
        artifacts: None,
        registry: Some(format!("http://{}", reg.host)),
    };
    // One cache for both builds, as on a machine that built the older tag first.
    let cache = Cache::at(dir.path().join("cache"));
    for reference in images.values() {
        let inputs = Inputs {
            images: std::collections::BTreeMap::from([("cni".to_owned(), reference.clone())]),
            lock_path: "payload.lock".into(),
            lock: lock.clone(),
            mirrors: mirrors.clone(),
        };
        let (files, record) =
            payload::resolve(&cache, &Default::default(), &inputs, "amd64", &|_| {}).unwrap();
        assert_eq!(record.images[0].reference, *reference);
        let archive = files
            .iter()
            .find(|f| f.dest.to_string_lossy().ends_with(".tar"))
            .unwrap();
        let mut tar = tar::Archive::new(std::fs::File::open(&archive.src).unwrap());
        let mut index = String::new();
        for entry in tar.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap().to_string_lossy() == "index.json" {
                std::io::Read::read_to_string(&mut entry, &mut index).unwrap();
            }
        }
        let index: serde_json::Value = serde_json::from_str(&index).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"][oci::CONTAINERD_NAME],
            reference.as_str()
        );
    }
}

#[test]
fn a_host_file_is_taken_out_of_its_pinned_image() {
    use image_builder::payload::{self, Inputs, Lock, LockedImage, Mirrors};
    use image_builder::spec::{ImageFile, Payload};
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let push_cache = Cache::at(dir.path().join("push"));
    let reference = "ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel1";
    let img = vm_tests::push::image_from_files(
        &push_cache,
        reference,
        "amd64",
        &[
            ("/flannel", &b"the plugin"[..], 0o755),
            ("/bin/sh", &b"a shell"[..], 0o755),
        ],
        &["/flannel"],
    )
    .unwrap();
    let target = format!("{}/flannel-io/flannel-cni-plugin:v1.9.1-flannel1", reg.host);
    let index = Pusher::direct()
        .push_indexed(&push_cache, &target.parse().unwrap(), &img, "amd64")
        .unwrap();
    let inputs = Inputs {
        images: std::collections::BTreeMap::from([(
            "flannel-cni-plugin".to_owned(),
            reference.to_owned(),
        )]),
        lock_path: "payload.lock".into(),
        lock: Lock {
            images: vec![LockedImage {
                reference: reference.into(),
                digest: index,
            }],
            ..Lock::default()
        },
        mirrors: Mirrors {
            artifacts: None,
            registry: Some(format!("http://{}", reg.host)),
        },
    };
    let mut spec = Payload {
        image_files: vec![ImageFile {
            image: "flannel-cni-plugin".into(),
            path: "/flannel".into(),
            install: "/usr/lib/cni/flannel".into(),
            mode: 0o755,
        }],
        ..Payload::default()
    };
    let cache = Cache::at(dir.path().join("cache"));
    let (files, record) = payload::resolve(&cache, &spec, &inputs, "amd64", &|_| {}).unwrap();
    let plugin = files
        .iter()
        .find(|f| f.dest == std::path::Path::new("usr/lib/cni/flannel"))
        .expect("the plugin is among the image's files");
    assert_eq!(std::fs::read(&plugin.src).unwrap(), b"the plugin");
    assert_eq!(plugin.mode, 0o755);
    let recorded = &record.image_files[0];
    assert_eq!(recorded.image, reference);
    assert_eq!(recorded.layer, record.images[0].layers[0].digest);
    assert_eq!(
        recorded.file_sha256,
        image_builder::cache::sha256_bytes(b"the plugin")
    );
    assert_eq!(recorded.path, "/usr/lib/cni/flannel");

    // A name the image list does not have is refused, naming those it has.
    spec.image_files[0].image = "flannel-cni".into();
    let err = payload::resolve(&cache, &spec, &inputs, "amd64", &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "flannel-cni: the image list has no image of that name (it has flannel-cni-plugin)"
        ),
        "{err}"
    );
}

#[test]
fn archives_are_deterministic_and_name_the_image() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::at(dir.path().join("cache"));
    // The same image made twice gives the same archive.
    let pause = || {
        vm_tests::push::image_from_files(
            &cache,
            "registry.k8s.io/pause:3.10.1",
            "amd64",
            &[("/pause", b"#!", 0o755)],
            &["/pause"],
        )
        .unwrap()
    };
    let img = pause();
    let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    oci::write_archive(&cache, &img, &a, oci::Layers::Included).unwrap();
    oci::write_archive(&cache, &pause(), &b, oci::Layers::Included).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let mut ar = tar::Archive::new(std::fs::File::open(&a).unwrap());
    let mut names = Vec::new();
    let mut index = String::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name == "index.json" {
            e.read_to_string(&mut index).unwrap();
        }
        names.push(name);
    }
    assert_eq!(&names[..2], ["oci-layout", "index.json"]);
    assert_eq!(names.len(), 5);
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"][oci::CONTAINERD_NAME],
        "registry.k8s.io/pause:3.10.1"
    );
    assert_eq!(
        index["manifests"][0]["digest"],
        img.manifest.digest.as_str()
    );

    // Without its layers: manifest and config only, same index.
    let c = dir.path().join("c.tar");
    oci::write_archive(&cache, &img, &c, oci::Layers::Outside).unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(&c).unwrap());
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    let hex = |d: &Descriptor| format!("blobs/sha256/{}", &d.digest[7..]);
    assert_eq!(
        names,
        [
            "oci-layout".to_owned(),
            "index.json".to_owned(),
            hex(&img.manifest),
            hex(&img.blobs[0])
        ]
    );
    assert!(!img.layers().is_empty());

    // What a later build finds in the cache is the same image.
    let cached = Pulled::cached(&cache, &img.reference, &img.manifest.digest, "amd64")
        .unwrap()
        .unwrap();
    assert_eq!(
        (&cached.manifest.digest, &cached.blobs),
        (&img.manifest.digest, &img.blobs)
    );
    assert!(Pulled::cached(
        &cache,
        &img.reference,
        &format!("sha256:{}", "0".repeat(64)),
        "amd64"
    )
    .unwrap()
    .is_none());
}
