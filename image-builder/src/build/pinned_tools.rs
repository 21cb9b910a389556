//! The build-tools stage: the packages `image.lock` pins for the build
//! itself (`[[tool]]`: mkfs.erofs and every library it loads, libc
//! included), unpacked with `dpkg-deb -x`. The build runs them through the
//! loader they brought, so the root filesystem is written by the pinned
//! release whatever the host runs, and nothing of them reaches the image.

use super::stage::{Made, Stage};
use super::BuildError;
use crate::cache::Cache;
use crate::debian;
use crate::lockfile::LockedPackage;
use crate::progress::Progress;
use crate::tools;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The unpacked packages' directory inside the stage's.
const TREE: &str = "tree";
/// The loader and the library directory, where Debian's amd64 libc puts them.
const LOADER: &str = "usr/lib64/ld-linux-x86-64.so.2";
const LIBRARIES: &str = "usr/lib/x86_64-linux-gnu";

/// Every input of the tools stage.
#[derive(Debug, Serialize)]
pub struct PinnedTools<'a> {
    /// Keyed by their names, versions and sha256s.
    pub packages: &'a [LockedPackage],
    /// Where the locked .debs are (by sha256, so not an input).
    #[serde(skip)]
    pub cache: &'a Cache,
}

/// What the tools stage learnt: the packages unpacked.
#[derive(Debug, Serialize, Deserialize)]
pub struct ToolsOutput {
    /// `name version` of each package.
    pub packages: Vec<String>,
}

impl Stage for PinnedTools<'_> {
    const NAME: &'static str = "build tools";
    /// Not `tools`: the cache's `tools/` holds programs CI installs, which
    /// pruning this stage's entries would remove.
    const KIND: &'static str = "build-tools";
    type Output = ToolsOutput;

    fn make(&self, dir: &Path, _: &Progress) -> Result<ToolsOutput, BuildError> {
        let tree = dir.join(TREE);
        for pkg in self.packages {
            tools::run(
                tools::command(tools::DPKG_DEB)?
                    .arg("-x")
                    .arg(debian::cached_deb(self.cache, pkg))
                    .arg(&tree),
            )?;
        }
        Ok(ToolsOutput {
            packages: self
                .packages
                .iter()
                .map(|p| format!("{} {}", p.name, p.version))
                .collect(),
        })
    }

    fn note(&self, output: &ToolsOutput) -> String {
        format!("{} packages", output.packages.len())
    }
}

impl Made<ToolsOutput> {
    /// A command that runs `program` (a path inside the packages, such as
    /// `usr/bin/mkfs.erofs`) with the packages' own loader and libraries,
    /// and none of the host's.
    pub fn command(&self, program: &str) -> Result<Command, BuildError> {
        let tree = self.file(TREE);
        let path = |rel: &str| -> Result<PathBuf, BuildError> {
            let p = tree.join(rel);
            if p.exists() {
                Ok(p)
            } else {
                Err(BuildError::Inputs {
                    stage: PinnedTools::NAME,
                    message: format!(
                        "the locked tool packages have no {rel}; \
                         run `image-builder lock --tools-only` to pin them again"
                    ),
                })
            }
        };
        let mut cmd = Command::new(path(LOADER)?);
        cmd.arg("--inhibit-cache")
            .arg("--library-path")
            .arg(path(LIBRARIES)?)
            .arg(path(program)?);
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn made(dir: &Path) -> Made<ToolsOutput> {
        Made {
            dir: dir.to_owned(),
            key: "k".into(),
            output: ToolsOutput { packages: vec![] },
        }
    }

    #[test]
    fn a_tool_runs_through_the_packages_loader_and_libraries_only() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join(TREE);
        for f in [LOADER, "usr/bin/mkfs.erofs"] {
            fs::create_dir_all(tree.join(f).parent().unwrap()).unwrap();
            fs::write(tree.join(f), "").unwrap();
        }
        fs::create_dir_all(tree.join(LIBRARIES)).unwrap();
        let cmd = made(dir.path()).command("usr/bin/mkfs.erofs").unwrap();
        assert_eq!(cmd.get_program(), tree.join(LOADER));
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            args,
            [
                "--inhibit-cache".as_ref(),
                "--library-path".as_ref(),
                tree.join(LIBRARIES).as_os_str(),
                tree.join("usr/bin/mkfs.erofs").as_os_str(),
            ]
        );
    }

    #[test]
    fn packages_without_the_program_say_how_to_pin_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let err = made(dir.path())
            .command("usr/bin/mkfs.erofs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lock --tools-only"), "{err}");
    }
}
