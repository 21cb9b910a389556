//! An images list as the image build writes it (`images.json`, the layers
//! beside it in `blobs/sha256/`), holding one image with one file: for
//! tests of the code that reads files out of the images a node carries.

use anyhow::Result;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Writes below `dir` a list naming one image, `reference`, whose only
/// layer (a gzip'd tar) holds `body` at `path` (mode 0755); returns the
/// list's path.
pub fn list_with_file(dir: &Path, reference: &str, path: &str, body: &[u8]) -> Result<PathBuf> {
    let mut layer = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(u64::try_from(body.len())?);
    header.set_mode(0o755);
    header.set_cksum();
    layer.append_data(&mut header, path.trim_start_matches('/'), body)?;
    let bytes = layer.into_inner()?.finish()?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(&digest), &bytes)?;
    let list = dir.join("images.json");
    let entry = serde_json::json!([{
        "archive": "/unused.tar",
        "reference": reference,
        "digest": "sha256:00",
        "layers": [{"digest": format!("sha256:{digest}"), "size": bytes.len()}],
    }]);
    std::fs::write(&list, entry.to_string())?;
    Ok(list)
}
