//! `image-builder lock --payload-only --update NAME=VERSION`: the one way a
//! payload entry moves to another release. The spec's own files are edited
//! in place (comments and layout kept): an artifact's version and the
//! version inside its URL, with every artifact that shares its download;
//! an image's tag in the image list. Nothing is written until every new
//! entry has been resolved and pinned.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// One `NAME=VERSION` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub name: String,
    pub version: String,
}

impl FromStr for Update {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((name, version)) if !name.is_empty() && !version.is_empty() => Ok(Self {
                name: name.trim().to_owned(),
                version: version.trim().to_owned(),
            }),
            _ => Err(format!("{s:?} is not NAME=VERSION (kubelet=v1.36.4)")),
        }
    }
}

/// One entry moved: `artifact kubelet` or `image kube-apiserver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub what: String,
    pub from: String,
    pub to: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.what, self.from, self.to)
    }
}

/// The spec and the image list, edited.
#[derive(Debug)]
pub struct Edited {
    pub spec: String,
    pub images: Option<String>,
    pub changes: Vec<Change>,
}

/// Applies `updates` to the spec's text and the image list's text.
pub fn apply(spec: &str, images: Option<&str>, updates: &[Update]) -> Result<Edited, String> {
    let mut spec_doc: toml_edit::DocumentMut =
        spec.parse().map_err(|e| format!("the spec: {e}"))?;
    let mut images_doc = match images {
        Some(text) => Some(
            text.parse::<toml_edit::DocumentMut>()
                .map_err(|e| format!("the image list: {e}"))?,
        ),
        None => None,
    };
    let mut changes = Vec::new();
    for update in updates {
        let before = changes.len();
        update_artifacts(&mut spec_doc, update, &mut changes)?;
        if let Some(doc) = images_doc.as_mut() {
            update_image(doc, update, &mut changes)?;
        }
        if changes.len() == before {
            return Err(format!(
                "{} names no payload artifact or image (the spec's [[payload.artifact]] names, the image list's keys)",
                update.name
            ));
        }
    }
    Ok(Edited {
        spec: spec_doc.to_string(),
        images: images_doc.map(|d| d.to_string()),
        changes,
    })
}

/// The artifacts named `update.name`, and every artifact downloaded from
/// the same URL (a release archive's other members).
fn update_artifacts(
    doc: &mut toml_edit::DocumentMut,
    update: &Update,
    changes: &mut Vec<Change>,
) -> Result<(), String> {
    let Some(artifacts) = doc
        .get_mut("payload")
        .and_then(|p| p.get_mut("artifact"))
        .and_then(|a| a.as_array_of_tables_mut())
    else {
        return Ok(());
    };
    let field = |t: &toml_edit::Table, key: &str| {
        t.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let urls: BTreeSet<String> = artifacts
        .iter()
        .filter(|t| field(t, "name") == update.name)
        .map(|t| field(t, "url"))
        .collect();
    for table in artifacts.iter_mut() {
        if !urls.contains(&field(table, "url")) {
            continue;
        }
        let (name, old, url) = (
            field(table, "name"),
            field(table, "version"),
            field(table, "url"),
        );
        if old == update.version {
            return Err(format!("artifact {name} is already at {old}"));
        }
        // The version appears in the URL with or without its `v`
        // (`…/v2.3.4/containerd-2.3.4-linux-amd64.tar.gz`).
        let (old_bare, new_bare) = (bare(&old), bare(&update.version));
        if !url.contains(old_bare) {
            return Err(format!(
                "artifact {name}: its URL {url} does not contain its version {old}; edit the spec by hand"
            ));
        }
        table["version"] = toml_edit::value(update.version.as_str());
        table["url"] = toml_edit::value(url.replace(old_bare, new_bare));
        changes.push(Change {
            what: format!("artifact {name}"),
            from: old,
            to: update.version.clone(),
        });
    }
    Ok(())
}

fn update_image(
    doc: &mut toml_edit::DocumentMut,
    update: &Update,
    changes: &mut Vec<Change>,
) -> Result<(), String> {
    let Some(reference) = doc.get(&update.name).and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let Some((repository, tag)) = reference.rsplit_once(':').filter(|(r, _)| !r.contains('@'))
    else {
        return Err(format!("image {}: {reference} has no tag", update.name));
    };
    if tag == update.version {
        return Err(format!("image {} is already at {tag}", update.name));
    }
    let to = format!("{repository}:{}", update.version);
    changes.push(Change {
        what: format!("image {}", update.name),
        from: reference.to_owned(),
        to: to.clone(),
    });
    // Keep the entry's own decoration (a trailing comment).
    let decor = doc[&update.name]
        .as_value()
        .map(|v| v.decor().clone())
        .unwrap_or_default();
    let mut value = toml_edit::Value::from(to);
    *value.decor_mut() = decor;
    doc[&update.name] = toml_edit::Item::Value(value);
    Ok(())
}

fn bare(version: &str) -> &str {
    version.strip_prefix('v').unwrap_or(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"# the spec
[payload]
images = "images.toml"

[[payload.artifact]]
name = "kubelet"   # the node agent
version = "v1.36.3"
url = "https://dl.k8s.io/release/v1.36.3/bin/linux/amd64/kubelet"
install = "/usr/bin/kubelet"

[[payload.artifact]]
name = "containerd"
version = "v2.3.4"
url = "https://github.com/containerd/containerd/releases/download/v2.3.4/containerd-2.3.4-linux-amd64.tar.gz"
extract = "bin/containerd"
install = "/usr/bin/containerd"

[[payload.artifact]]
name = "ctr"
version = "v2.3.4"
url = "https://github.com/containerd/containerd/releases/download/v2.3.4/containerd-2.3.4-linux-amd64.tar.gz"
extract = "bin/ctr"
install = "/usr/bin/ctr"
"#;

    const IMAGES: &str = "# images\npause = \"registry.k8s.io/pause:3.10.2\"\nkube-apiserver = \"registry.k8s.io/kube-apiserver:v1.36.3\" # control plane\n";

    fn update(s: &str) -> Update {
        s.parse().unwrap()
    }

    #[test]
    fn an_artifact_moves_with_its_url_and_the_rest_is_kept_as_written() {
        let edited = apply(SPEC, Some(IMAGES), &[update("kubelet=v1.36.4")]).unwrap();
        assert_eq!(
            edited.changes,
            [Change {
                what: "artifact kubelet".into(),
                from: "v1.36.3".into(),
                to: "v1.36.4".into()
            }]
        );
        let expected = SPEC
            .replace("version = \"v1.36.3\"", "version = \"v1.36.4\"")
            .replace("release/v1.36.3/bin", "release/v1.36.4/bin");
        assert_eq!(edited.spec, expected);
        assert_eq!(edited.images.as_deref(), Some(IMAGES));
    }

    #[test]
    fn the_members_of_one_download_move_together() {
        let edited = apply(SPEC, None, &[update("containerd=v2.3.5")]).unwrap();
        let moved: Vec<String> = edited.changes.iter().map(|c| c.what.clone()).collect();
        assert_eq!(moved, ["artifact containerd", "artifact ctr"]);
        assert!(!edited.spec.contains("2.3.4"), "{}", edited.spec);
        assert_eq!(
            edited
                .spec
                .matches("download/v2.3.5/containerd-2.3.5-linux-amd64.tar.gz")
                .count(),
            2
        );
    }

    #[test]
    fn an_image_moves_its_tag_and_keeps_its_comment() {
        let edited = apply(SPEC, Some(IMAGES), &[update("kube-apiserver=v1.36.4")]).unwrap();
        assert_eq!(
            edited.images.as_deref(),
            Some(
                IMAGES
                    .replace("kube-apiserver:v1.36.3", "kube-apiserver:v1.36.4")
                    .as_str()
            )
        );
        assert_eq!(
            edited.changes[0].to,
            "registry.k8s.io/kube-apiserver:v1.36.4"
        );
        assert_eq!(edited.spec, SPEC);
    }

    #[test]
    fn unknown_names_same_versions_and_bad_requests_are_refused() {
        let err = apply(SPEC, Some(IMAGES), &[update("kubelte=v1.36.4")]).unwrap_err();
        assert!(
            err.starts_with("kubelte names no payload artifact or image"),
            "{err}"
        );
        let err = apply(SPEC, Some(IMAGES), &[update("kubelet=v1.36.3")]).unwrap_err();
        assert_eq!(err, "artifact kubelet is already at v1.36.3");
        for bad in ["kubelet", "=v1", "kubelet="] {
            assert!(bad.parse::<Update>().is_err(), "{bad}");
        }
    }
}
