//! Host configuration and Kubernetes manifests, rendered with tera from the
//! templates the image carries (`manifests/` in the source tree,
//! `/usr/share/slipway/manifests` in the image):
//!
//! | template            | rendered to                          | for     |
//! |---------------------|--------------------------------------|---------|
//! | `host/kubelet.yaml` | `/etc/kubernetes/kubelet.yaml`       | all     |
//! | `host/kubelet.env`  | `/etc/kubernetes/kubelet.env`        | all     |
//! | `static/*.yaml`     | `/etc/kubernetes/manifests/` (the API server's clients held in `/etc/kubernetes/manifests-held/` until it answers) | masters |
//! | `control-plane/*.yaml` | `<secrets>/control-plane/` (tmpfs: the API server's authentication, admission, audit and encryption configuration; the last holds the Secrets key) | masters |
//! | `addons/*.yaml`     | `<secrets>/addons/` (tmpfs: holds the bootstrap token) | masters |
//!
//! `images.toml` names the container images the templates use;
//! `host/containerd.toml` is not a template (containerd reads it in place).

use crate::config::{Role, StackConfig};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Images { path: String, message: String },
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    /// Names the token by a fingerprint, never by its value.
    #[error("the bootstrap token (sha256 {0}…) is not of the form <6>.<16>")]
    Token(String),
}

/// Below the secrets tmpfs: the API server's configuration files.
pub const CONTROL_PLANE_DIR: &str = "control-plane";

/// Below `/etc`: the static pods the kubelet runs.
pub const STATIC_PODS: &str = "kubernetes/manifests";
/// Below `/etc`: where the static pods in [`AFTER_API`] wait, at each boot,
/// until the API server answers.
pub const HELD_PODS: &str = "kubernetes/manifests-held";
/// The static pods that only talk to the API server. Started beside it on a
/// slow machine, they take CPU from its start, then give up waiting for it
/// and exit, and the kubelet's back-off holds them for minutes after it is
/// up. So each boot hands them to the kubelet only once it is ready
/// ([`release_held_pods`]). Handed over at its first answer
/// instead (serving, its RBAC bootstrap still running), their start took
/// the CPU that bootstrap needed: it was ready 55 s after that answer
/// rather than 25 s, and the controller manager exited once for want of
/// `/healthz` (README, "What the API server waits on").
pub const AFTER_API: &[&str] = &["kube-controller-manager.yaml", "kube-scheduler.yaml"];

/// Where a rendered file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Below `/etc` (the writable overlay on /run, rebuilt every boot).
    Etc,
    /// Below the secrets tmpfs.
    Secrets,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub target: Target,
    /// Relative to the target's root (`kubernetes/manifests/etcd.yaml`).
    pub path: PathBuf,
    pub content: String,
}

impl Rendered {
    /// Where the file goes below `root` (its target's root): a static pod
    /// of [`AFTER_API`] is held until [`release_held_pods`] hands it over,
    /// and written in place once this boot has done so.
    pub fn destination(&self, root: &Path) -> PathBuf {
        let in_place = root.join(&self.path);
        match self.path.file_name() {
            Some(name)
                if self.path.parent() == Some(Path::new(STATIC_PODS))
                    && AFTER_API.iter().any(|a| name == *a)
                    && !in_place.exists() =>
            {
                root.join(HELD_PODS).join(name)
            }
            _ => in_place,
        }
    }
}

/// Hands the held static pods (see [`AFTER_API`]) below `etc` to the
/// kubelet; returns the names of those it moved (none when this boot
/// already did, or on a node).
pub fn release_held_pods(etc: &Path) -> std::io::Result<Vec<String>> {
    let held = etc.join(HELD_PODS);
    let entries = match std::fs::read_dir(&held) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names: Vec<std::ffi::OsString> = entries
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let pods = etc.join(STATIC_PODS);
    std::fs::create_dir_all(&pods)?;
    let mut moved = Vec::new();
    for name in names {
        // Within /etc's one file system: the kubelet sees the whole file
        // appear at once.
        std::fs::rename(held.join(&name), pods.join(&name))?;
        moved.push(name.to_string_lossy().into_owned());
    }
    Ok(moved)
}

/// The templates and the image list, loaded once.
#[derive(Debug)]
pub struct Templates {
    tera: tera::Tera,
    /// `(template name, target, path below the target)`, in render order.
    outputs: Vec<(String, Target, PathBuf, Option<Role>)>,
    pub images: BTreeMap<String, String>,
}

/// What differs between instances.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub config: &'a StackConfig,
    pub node_name: String,
    /// The address the kubelet registers (the master's stable private IP).
    pub node_ip: Option<Ipv4Addr>,
    /// Where the PKI sits on the tmpfs, as the pods see it.
    pub pki: PathBuf,
    /// `<id>.<secret>`; masters only (the add-ons create its Secret).
    pub bootstrap_token: Option<&'a str>,
    /// When that token expires (RFC 3339), if it does.
    pub token_expires: Option<&'a str>,
    /// The key Secrets are encrypted with in etcd; masters only.
    pub encryption_key: Option<&'a str>,
    /// The image's release (`IMAGE_VERSION` in os-release), when it is a
    /// valid label value: the node's `slipway/release` label.
    pub release: Option<String>,
}

/// The Node label naming a member's release.
pub const RELEASE_LABEL: &str = "slipway/release";

/// The image's release as a label value, from the os-release file in
/// `etc`; `None` without one, or when it cannot be a label value.
pub fn image_release(etc: &Path) -> Option<String> {
    release_label(&std::fs::read_to_string(etc.join("os-release")).ok()?)
}

/// The image's version from an os-release file's text, if it can be a
/// label value (at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends).
pub fn release_label(os_release: &str) -> Option<String> {
    let value = os_release
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))?
        .trim()
        .trim_matches(|c| c == '"' || c == '\'');
    let fits = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    fits.then(|| value.to_owned())
}

/// The master's node name: derived from its stable private IP, so that a
/// replacement master registers as the same node.
pub fn master_node_name(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("ip-{a}-{b}-{c}-{d}")
}

fn read(path: &Path) -> Result<String, RenderError> {
    std::fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>, RenderError> {
    let entries = std::fs::read_dir(dir).map_err(|source| RenderError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

impl Templates {
    pub fn load(dir: &Path) -> Result<Self, RenderError> {
        let images_path = dir.join(crate::contract::IMAGE_NAMES);
        let images: BTreeMap<String, String> =
            toml::from_str(&read(&images_path)?).map_err(|e| RenderError::Images {
                path: images_path.display().to_string(),
                message: e.message().to_owned(),
            })?;
        let mut outputs = vec![
            (
                "host/kubelet.yaml".to_owned(),
                Target::Etc,
                PathBuf::from("kubernetes/kubelet.yaml"),
                None,
            ),
            (
                "host/kubelet.env".to_owned(),
                Target::Etc,
                PathBuf::from("kubernetes/kubelet.env"),
                None,
            ),
        ];
        for (sub, target, below) in [
            ("static", Target::Etc, STATIC_PODS),
            ("control-plane", Target::Secrets, CONTROL_PLANE_DIR),
            ("addons", Target::Secrets, "addons"),
        ] {
            for file in sorted_files(&dir.join(sub))? {
                let name = file.file_name().unwrap_or_default().to_owned();
                outputs.push((
                    format!("{sub}/{}", name.to_string_lossy()),
                    target,
                    Path::new(below).join(name),
                    Some(Role::Master),
                ));
            }
        }
        let mut tera = tera::Tera::default();
        for (name, ..) in &outputs {
            let text = read(&dir.join(name))?;
            tera.add_raw_template(name, &text)
                .map_err(|e| RenderError::Template {
                    name: name.clone(),
                    message: crate::error_chain(&e, ": "),
                })?;
        }
        Ok(Self {
            tera,
            outputs,
            images,
        })
    }

    /// Renders every file the role needs.
    pub fn render(&self, inputs: &Inputs<'_>) -> Result<Vec<Rendered>, RenderError> {
        let config = inputs.config;
        let mut ctx = tera::Context::new();
        ctx.insert("role", &config.role().to_string());
        ctx.insert("cluster_name", &config.cluster_name);
        ctx.insert("node_name", &inputs.node_name);
        ctx.insert("node_ip", &inputs.node_ip.map(|ip| ip.to_string()));
        ctx.insert("api_name", &config.api_name);
        ctx.insert("pod_cidr", &config.pod_cidr.to_string());
        ctx.insert("service_cidr", &config.service_cidr.to_string());
        ctx.insert("dns_service_ip", &config.dns_service_ip().to_string());
        ctx.insert("pki", &inputs.pki.display().to_string());
        let secrets = inputs.pki.parent().unwrap_or(&inputs.pki);
        ctx.insert(
            "control_plane",
            &secrets.join(CONTROL_PLANE_DIR).display().to_string(),
        );
        if let Some(key) = inputs.encryption_key {
            ctx.insert("encryption_key", key);
        }
        ctx.insert("images", &self.images);
        ctx.insert("release", &inputs.release);
        ctx.insert("release_label", RELEASE_LABEL);
        if let Some(token) = inputs.bootstrap_token {
            let (id, secret) = token
                .split_once('.')
                .filter(|(i, s)| i.len() == 6 && s.len() == 16)
                .ok_or_else(|| RenderError::Token(crate::pki::fingerprint(token)))?;
            ctx.insert("token_id", id);
            ctx.insert("token_secret", secret);
        }
        if let Some(expires) = inputs.token_expires {
            ctx.insert("token_expires", expires);
        }
        let mut out = Vec::new();
        for (name, target, path, only_for) in &self.outputs {
            if only_for.is_some_and(|r| r != config.role()) {
                continue;
            }
            let content = self
                .tera
                .render(name, &ctx)
                .map_err(|e| RenderError::Template {
                    name: name.clone(),
                    message: crate::error_chain(&e, ": "),
                })?;
            out.push(Rendered {
                target: *target,
                path: path.clone(),
                content,
            });
        }
        Ok(out)
    }
}
