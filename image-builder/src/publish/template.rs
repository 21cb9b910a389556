//! The release's CloudFormation template: the source in `cfn/` with its
//! `Mappings.RegionMap` filled in with exactly the AMIs this release
//! registered and `Mappings.Release` with its image and Kubernetes
//! versions (tagged on every instance), written as JSON (keys sorted, so the same release renders
//! the same bytes) after passing the security rules.

use super::rules;
use super::PublishError;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// What a release is, as the template records it.
#[derive(Debug, Clone, Copy)]
pub struct Versions<'a> {
    pub image: &'a str,
    pub disk_sha256: &'a str,
    /// The Kubernetes version the image ships (its kubelet's).
    pub kubernetes: &'a str,
}

/// Renders the template for `amis` (region → AMI ID).
pub fn render(
    source: &Path,
    release: Versions<'_>,
    amis: &BTreeMap<String, String>,
) -> Result<String, PublishError> {
    let version = release.image;
    let text = std::fs::read_to_string(source).map_err(crate::fsio::at("reading", source))?;
    let mut t: Value = serde_yaml_ng::from_str(&text).map_err(|e| {
        PublishError::Invalid(format!("{} is not valid YAML: {e}", source.display()))
    })?;
    if !t["Resources"].is_object() {
        return Err(PublishError::Invalid(format!(
            "{} has no Resources",
            source.display()
        )));
    }
    if amis.is_empty() {
        return Err(PublishError::Invalid(
            "no AMIs to put in the template".into(),
        ));
    }
    let map: serde_json::Map<String, Value> = amis
        .iter()
        .map(|(region, ami)| (region.clone(), json!({ "AMI": ami })))
        .collect();
    t["Mappings"]["RegionMap"] = Value::Object(map);
    t["Mappings"]["Release"] = json!({
        "Image": { "Version": version, "Kubernetes": release.kubernetes },
    });
    t["Metadata"]["Slipway::Release"] = json!({
        "ImageVersion": version,
        "DiskSha256": release.disk_sha256,
        "Kubernetes": release.kubernetes,
    });
    if let Some(d) = t["Description"].as_str() {
        t["Description"] = Value::String(format!("{d} Release {version}."));
    }
    let violations = rules::check(&t);
    if !violations.is_empty() {
        let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
        return Err(PublishError::Rules(list.join("; ")));
    }
    let mut out = serde_json::to_string_pretty(&t)
        .map_err(|e| PublishError::Invalid(format!("serialising the template: {e}")))?;
    out.push('\n');
    Ok(out)
}
