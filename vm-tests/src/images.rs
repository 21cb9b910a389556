//! An images list as the image build writes it (`images.json`, each layer
//! unpacked beside it in `layers/<digest>/`), holding one image with one
//! file: for tests of the code that reads files out of the images a node
//! carries.

use anyhow::Result;
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes below `dir` a list naming one image, `reference`, whose only
/// layer holds `body` at `path` (mode 0755), unpacked as the build
/// unpacks it; returns the list's path.
pub fn list_with_file(dir: &Path, reference: &str, path: &str, body: &[u8]) -> Result<PathBuf> {
    // The layer's digest names its directory; a digest of what it holds
    // serves as well as its tar's would.
    let digest = hex::encode(Sha256::digest([path.as_bytes(), body].concat()));
    let file = dir
        .join("layers")
        .join(&digest)
        .join(path.trim_start_matches('/'));
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&file, body)?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
    let list = dir.join("images.json");
    let entry = serde_json::json!([{
        "archive": "/unused.tar",
        "reference": reference,
        "digest": "sha256:00",
        "layers": [{"digest": format!("sha256:{digest}"), "size": body.len()}],
    }]);
    std::fs::write(&list, entry.to_string())?;
    Ok(list)
}
