//! Filesystem errors that say what was being done, and to which path. Every
//! module's error enum wraps this one instead of repeating it.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct PathError {
    pub what: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// `map_err` adapter: `fs::read(p).map_err(at("reading", p))?`.
pub fn at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PathError + 'a {
    move |source| PathError {
        what,
        path: path.to_owned(),
        source,
    }
}
