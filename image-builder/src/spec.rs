//! The appliance spec (`image.toml`): what goes into the image and how the
//! disk is laid out. Parsing is strict: an unknown key or a bad value is an
//! error that names the key.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading spec {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spec {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("spec {path}: `{key}` {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub image: Image,
    pub debian: Debian,
    pub kernel: Kernel,
    pub overlay: Overlay,
    #[serde(default)]
    pub payload: Payload,
}

/// The Kubernetes payload (see `crate::payload`); pinned in `payload.lock`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The container image list (name → reference), relative to the spec;
    /// every image in it is pulled at build time.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Host binaries.
    #[serde(default, rename = "artifact")]
    pub artifacts: Vec<Artifact>,
    /// Host files taken out of the images in the list.
    #[serde(default, rename = "image_file")]
    pub image_files: Vec<ImageFile>,
    /// The architectures payload.lock pins artifacts for (default: the
    /// image's own), so that building for another is one setting away.
    #[serde(default)]
    pub arches: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Image name; also the prefix of partition and filesystem identities.
    pub name: String,
    /// Image version, paired one-to-one with a template version.
    pub version: String,
    /// Timestamp every file and filesystem in the image carries.
    pub source_date_epoch: u64,
    /// Whole disk size in GiB (EBS volumes come in whole GiB); by default
    /// the fewest that hold the partitions. `/var` is last and grows at
    /// boot to the end of whatever volume the instance has.
    #[serde(default)]
    pub disk_size_gib: Option<u64>,
    #[serde(default = "default_esp_mib")]
    pub esp_size_mib: u64,
    #[serde(default = "default_var_mib")]
    pub var_size_mib: u64,
    /// The architecture built (Debian's name): `amd64`. `arm64` is accepted
    /// and its payload pinned, but not yet built (see the README).
    #[serde(default = "default_arch")]
    pub arch: String,
}

/// The architectures a spec may name, in Debian's (and OCI's) spelling.
pub const ARCHES: &[&str] = &["amd64", "arm64"];

/// The architectures the builder can build today.
pub const BUILT_ARCHES: &[&str] = &["amd64"];

fn default_arch() -> String {
    "amd64".to_owned()
}

fn default_esp_mib() -> u64 {
    64
}
fn default_var_mib() -> u64 {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debian {
    pub suite: String,
    /// mmdebstrap variant used to resolve the package set.
    #[serde(default = "default_variant")]
    pub variant: String,
    pub packages: Vec<String>,
    /// dpkg path-exclude patterns: files never unpacked into the image.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Debian mirror; when unset, the one this machine's apt uses.
    #[serde(default)]
    pub mirror: Option<String>,
}

fn default_variant() -> String {
    "minbase".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// Command line baked into the UKI; the verity root hash is appended.
    pub cmdline: String,
    /// Modules (by name) the initramfs loads, with their dependencies.
    pub initrd_modules: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    /// Directory of systemd units, relative to the spec.
    pub units: PathBuf,
    /// Directory of manifests, relative to the spec.
    pub manifests: PathBuf,
    /// Binaries from the workspace's build output installed to /usr/bin.
    pub binaries: Vec<String>,
    /// A tree laid over the image root as it is: host configuration
    /// (network, sysctl, modules) and the symlinks that enable units.
    #[serde(default)]
    pub root: Option<PathBuf>,
}

const MAX_DISK_GIB: u64 = 16 * 1024;

impl Spec {
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, SpecError> {
        let spec: Spec = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// The architectures payload.lock pins: `payload.arches`, else the
    /// image's.
    pub fn pinned_arches(&self) -> Vec<&str> {
        if self.payload.arches.is_empty() {
            vec![self.image.arch.as_str()]
        } else {
            self.payload.arches.iter().map(String::as_str).collect()
        }
    }

    /// Builds `version` instead of the spec's `image.version` (a release
    /// stamped by its pipeline), checked as the spec's own would be.
    pub fn override_version(&mut self, version: &str, path: &Path) -> Result<(), SpecError> {
        self.image.version = version.to_owned();
        self.validate(path)
    }

    fn validate(&self, path: &Path) -> Result<(), SpecError> {
        let invalid = |key, problem: &str| SpecError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        let ident = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        };
        if !ident(&self.image.name) {
            return Err(invalid(
                "image.name",
                "must be 1-64 characters of [A-Za-z0-9-_.+]",
            ));
        }
        if !ident(&self.image.version) {
            return Err(invalid(
                "image.version",
                "must be 1-64 characters of [A-Za-z0-9-_.+]",
            ));
        }
        if self
            .image
            .disk_size_gib
            .is_some_and(|g| g == 0 || g > MAX_DISK_GIB)
        {
            return Err(invalid(
                "image.disk_size_gib",
                "must be between 1 and 16384",
            ));
        }
        let known = |a: &String| ARCHES.contains(&a.as_str());
        if !known(&self.image.arch) {
            return Err(invalid("image.arch", "must be one of amd64, arm64"));
        }
        if let Some(bad) = self.payload.arches.iter().find(|a| !known(a)) {
            return Err(invalid(
                "payload.arches",
                &format!("names {bad:?}; each must be one of amd64, arm64"),
            ));
        }
        if !self.payload.arches.is_empty() && !self.payload.arches.contains(&self.image.arch) {
            return Err(invalid(
                "payload.arches",
                &format!("must include image.arch ({})", self.image.arch),
            ));
        }
        if self.image.esp_size_mib < 32 {
            return Err(invalid("image.esp_size_mib", "must be at least 32"));
        }
        if self.image.var_size_mib < 64 {
            return Err(invalid("image.var_size_mib", "must be at least 64"));
        }
        if !ident(&self.debian.suite) {
            return Err(invalid(
                "debian.suite",
                "must name a Debian suite, e.g. \"trixie\"",
            ));
        }
        if self.debian.packages.is_empty() {
            return Err(invalid("debian.packages", "must list at least one package"));
        }
        if let Some(bad) = self.debian.packages.iter().find(|p| !ident(p)) {
            return Err(invalid(
                "debian.packages",
                &format!("has an invalid package name {bad:?}"),
            ));
        }
        if self.kernel.cmdline.contains("roothash=") {
            return Err(invalid(
                "kernel.cmdline",
                "must not set roothash=: the build appends it",
            ));
        }
        if self
            .overlay
            .binaries
            .iter()
            .any(|b| b.contains('/') || b.is_empty())
        {
            return Err(invalid("overlay.binaries", "takes bare binary names"));
        }
        for a in &self.payload.artifacts {
            if !ident(&a.name) || !ident(&a.version) {
                return Err(invalid(
                    "payload.artifact",
                    &format!(
                        "{:?} {:?}: name and version must be 1-64 characters of [A-Za-z0-9-_.+]",
                        a.name, a.version
                    ),
                ));
            }
            if !a.install.is_absolute() || a.install.components().any(|c| c.as_os_str() == "..") {
                return Err(invalid(
                    "payload.artifact",
                    &format!("{}: install must be an absolute path without `..`", a.name),
                ));
            }
            if !(a.url.starts_with("https://")
                || a.url.starts_with("http://")
                || a.url.starts_with("file://"))
            {
                return Err(invalid(
                    "payload.artifact",
                    &format!("{}: url must be http(s):// or file://", a.name),
                ));
            }
        }
        for f in &self.payload.image_files {
            if !Path::new(&f.path).is_absolute() || f.path.ends_with('/') {
                return Err(invalid(
                    "payload.image_file",
                    &format!("{}: path must name a file by its absolute path", f.image),
                ));
            }
            if !f.install.is_absolute() || f.install.components().any(|c| c.as_os_str() == "..") {
                return Err(invalid(
                    "payload.image_file",
                    &format!("{}: install must be an absolute path without `..`", f.image),
                ));
            }
        }
        Ok(())
    }
}

/// A file installed on the host from one of the payload's images, for a
/// program upstream ships only as an image: the image's pin pins the file,
/// and no container has to copy it onto the host at every boot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    /// The image's name in the image list (`flannel-cni-plugin`).
    pub image: String,
    /// The file's absolute path inside the image (`/flannel`).
    pub path: String,
    /// Where it goes on the host (absolute).
    pub install: PathBuf,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

/// One host binary, as the spec lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub name: String,
    pub version: String,
    /// Upstream URL; `{arch}` in it stands for the architecture
    /// (`…/bin/linux/{arch}/kubelet`).
    pub url: String,
    /// Where it goes in the image (absolute).
    pub install: PathBuf,
    /// For a `.tar.gz` download: the member to install (`bin/containerd`).
    #[serde(default)]
    pub extract: Option<String>,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o755
}

impl Artifact {
    /// Where upstream serves the artifact for `arch`.
    pub fn url_for(&self, arch: &str) -> String {
        self.url.replace("{arch}", arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[image]
name = "slipway"
version = "0.1.0"
source_date_epoch = 1767225600
disk_size_gib = 2

[debian]
suite = "trixie"
packages = ["systemd", "linux-image-cloud-amd64"]

[kernel]
cmdline = "console=ttyS0"
initrd_modules = ["dm-verity"]

[overlay]
units = "units"
manifests = "manifests"
binaries = ["slipway-init"]
"#;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(text, Path::new("image.toml"))
    }

    #[test]
    fn a_version_given_on_the_command_line_is_checked_like_the_specs() {
        let mut spec = parse(GOOD).unwrap();
        spec.override_version("0.2.0-rc1", Path::new("image.toml"))
            .unwrap();
        assert_eq!(spec.image.version, "0.2.0-rc1");
        let err = spec
            .override_version("0.2.0 beta", Path::new("image.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("image.version"), "{err}");
    }

    #[test]
    fn the_example_parses_with_defaults() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.debian.variant, "minbase");
        assert_eq!(spec.image.var_size_mib, 256);
        assert_eq!(spec.image.disk_size_gib, Some(2));
        assert_eq!(spec.image.arch, "amd64");
        assert_eq!(spec.pinned_arches(), ["amd64"]);
    }

    #[test]
    fn the_payload_may_be_pinned_for_more_architectures_than_the_image() {
        let both = GOOD.replace(
            "[overlay]",
            "[payload]\narches = [\"amd64\", \"arm64\"]\n\n[overlay]",
        );
        assert_eq!(parse(&both).unwrap().pinned_arches(), ["amd64", "arm64"]);
        let arm = both.replace("disk_size_gib = 2", "disk_size_gib = 2\narch = \"arm64\"");
        assert_eq!(parse(&arm).unwrap().image.arch, "arm64");
        let cases = [
            (
                GOOD.replace("disk_size_gib = 2", "arch = \"x86_64\""),
                "image.arch",
            ),
            (both.replace("\"arm64\"]", "\"riscv64\"]"), "payload.arches"),
            (
                both.replace("[\"amd64\", \"arm64\"]", "[\"arm64\"]"),
                "must include image.arch (amd64)",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should say {expected}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                GOOD.replace("disk_size_gib = 2", "disk_size_gib = 0"),
                "image.disk_size_gib",
            ),
            (
                GOOD.replace("disk_size_gib = 2", "disk_size_gib = \"big\""),
                "disk_size_gib",
            ),
            (
                GOOD.replace("suite = \"trixie\"", "suite = \"\""),
                "debian.suite",
            ),
            (GOOD.replace("[kernel]", "[kernel]\nflavour = 1"), "flavour"),
            (
                GOOD.replace("console=ttyS0", "roothash=00"),
                "kernel.cmdline",
            ),
            (
                GOOD.replace("\"systemd\",", "\"sys temd\","),
                "debian.packages",
            ),
            (GOOD.replace("name = \"slipway\"\n", ""), "name"),
            (
                format!("{GOOD}\n[[payload.image_file]]\nimage = \"cni\"\npath = \"flannel\"\ninstall = \"/usr/lib/cni/flannel\"\n"),
                "payload.image_file",
            ),
            (
                format!("{GOOD}\n[[payload.image_file]]\nimage = \"cni\"\npath = \"/flannel\"\ninstall = \"/usr/lib/../cni\"\n"),
                "payload.image_file",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err:?} should name {key}");
        }
        // The same file entry, with absolute paths, is taken.
        let good = format!(
            "{GOOD}\n[[payload.image_file]]\nimage = \"cni\"\npath = \"/flannel\"\n\
             install = \"/usr/lib/cni/flannel\"\n"
        );
        assert_eq!(parse(&good).unwrap().payload.image_files[0].mode, 0o755);
    }
}
