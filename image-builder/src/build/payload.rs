//! The payload stage: the Kubernetes binaries and container images the spec
//! and `payload.lock` pin, fetched into the cache when missing (each
//! checked against its pin) and handed to the overlay as files.

use super::BuildError;
use crate::cache::Cache;
use crate::payload::{self, PayloadFile, Recorded};
use crate::progress::{self, Outcome, Progress};
use crate::spec::Spec;
use std::fs;
use std::path::Path;

/// The payload's files for the image, and what the manifest records of it.
pub fn resolve(
    spec: &Spec,
    spec_dir: &Path,
    sources: &payload::Sources,
    cache: &Cache,
    progress: &Progress,
) -> Result<(Vec<PayloadFile>, Recorded), BuildError> {
    let inputs = payload::Inputs::load(spec, spec_dir, sources)?;
    if spec.payload.artifacts.is_empty()
        && inputs.images.is_empty()
        && spec.payload.image_files.is_empty()
    {
        return Ok((Vec::new(), Recorded::default()));
    }
    progress.stage("payload", || {
        let (files, record) =
            payload::resolve(cache, &spec.payload, &inputs, &spec.image.arch, &|m| {
                progress.note(m)
            })?;
        let bytes: u64 = files
            .iter()
            .map(|f| fs::metadata(&f.src).map(|m| m.len()).unwrap_or(0))
            .sum();
        let taken = match record.image_files.len() {
            0 => String::new(),
            1 => " (1 host file taken from them)".to_owned(),
            n => format!(" ({n} host files taken from them)"),
        };
        let note = format!(
            "{} artifacts, {} images{taken}, {}",
            record.artifacts.len(),
            record.images.len(),
            progress::bytes(bytes)
        );
        Ok::<_, BuildError>(((files, record), Outcome::built(note)))
    })
}
