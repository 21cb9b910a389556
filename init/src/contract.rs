//! The image's contract between the image builder, which lays the image
//! out, and slipway-init, which reads it at boot: where things are, and the
//! format of the list of container images. (The disk's own layout is in
//! [`crate::layout`].)

#[cfg(feature = "contract")]
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The add-on and static pod templates slipway-init renders.
pub const MANIFESTS_DIR: &str = "/usr/share/slipway/manifests";
/// In [`MANIFESTS_DIR`]: the container images the templates use, by name
/// (`name = "reference"`).
pub const IMAGE_NAMES: &str = "images.toml";
/// The pre-pulled images: an OCI archive (manifest and config) per image,
/// and the layers once each, unpacked, under [`LAYERS`].
pub const IMAGES_DIR: &str = "/usr/share/slipway/images";
/// In [`IMAGES_DIR`]: each layer unpacked as overlayfs stacks it (its
/// whiteouts overlayfs's), in a directory named by the layer's digest's
/// hex: what containerd's overlayfs snapshotter would have made of it.
pub const LAYERS: &str = "layers";
/// The list of the pre-pulled images ([`ListedImage`]s, as JSON).
pub const IMAGE_LIST: &str = "/usr/share/slipway/images/images.json";
/// Where the cluster's secrets live at run time: a tmpfs, never a disk.
pub const SECRETS_DIR: &str = "/srv/kubernetes";

/// One entry of [`IMAGE_LIST`]. (Fields in name order: the builder's list
/// has always been written with sorted keys.)
#[cfg(feature = "contract")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedImage {
    /// The image's OCI archive, absolute in the image.
    pub archive: String,
    /// The linux/amd64 image manifest's digest.
    pub digest: String,
    /// Its layers, each unpacked at `IMAGES_DIR/LAYERS/<hex>`.
    #[serde(default)]
    pub layers: Vec<ListedLayer>,
    pub reference: String,
}

#[cfg(feature = "contract")]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedLayer {
    pub digest: String,
    pub size: u64,
}

/// One of the paths above, relative to the image's root (for the builder,
/// which writes under a tree, and tests that lay one out).
pub fn in_tree(path: &str) -> &Path {
    Path::new(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_inside_the_images_and_paths_map_into_a_tree() {
        assert_eq!(Path::new(IMAGE_LIST).parent(), Some(Path::new(IMAGES_DIR)));
        assert_eq!(
            in_tree(SECRETS_DIR),
            Path::new("srv/kubernetes"),
            "a tree's path is relative"
        );
    }
}
