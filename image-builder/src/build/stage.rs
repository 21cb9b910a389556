//! The stage driver. A stage is a value holding every input of one step of
//! the build; serialised, it is the step's cache key, and [`Stage::make`]
//! sees nothing else, so the key and what the step uses cannot drift apart.
//! The driver looks the key up in the cache, makes the output in a
//! temporary directory when it is missing, stores the stage's [`Output`]
//! value beside its files, renames the directory into place, and reports
//! and times the step.
//!
//! [`Output`]: Stage::Output

use super::BuildError;
use crate::cache::{Cache, Key};
use crate::fsio;
use crate::progress::{Outcome, Progress};
use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use std::fs;
use std::path::{Path, PathBuf};

/// Bumped when a stage makes different output from the same inputs.
const BUILDER_EPOCH: &str = "slipway-image-builder-7";
/// The output value's file in a stage's directory.
const OUTPUT: &str = "output.json";

/// One cached step of the build.
pub trait Stage: Serialize {
    /// Its name in progress lines and in the manifest's timings.
    const NAME: &'static str;
    /// Its directory in the cache.
    const KIND: &'static str;
    /// What the step learnt while making its files (a root hash, a size).
    type Output: Serialize + DeserializeOwned;

    /// Fills `dir` (empty, created) and returns what later steps need.
    fn make(&self, dir: &Path, progress: &Progress) -> Result<Self::Output, BuildError>;

    /// A few words on the result for the progress line (a size).
    fn note(&self, output: &Self::Output) -> String;
}

/// A stage's result: its directory in the cache, its key and its output.
/// A later stage that holds one is keyed by this key, not by the path.
#[derive(Debug)]
pub struct Made<O> {
    pub dir: PathBuf,
    pub key: String,
    pub output: O,
}

impl<O> Made<O> {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl<O> Serialize for Made<O> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.key)
    }
}

/// The cache key of a stage: the hash of its serialised inputs.
pub fn key<S: Stage>(stage: &S) -> Result<String, BuildError> {
    digest(S::KIND, stage)
}

/// The hash of `kind` and a serialised value, under this builder's epoch.
pub fn digest<T: Serialize>(kind: &'static str, inputs: &T) -> Result<String, BuildError> {
    let json = serde_json::to_vec(inputs).map_err(|e| BuildError::Inputs {
        stage: kind,
        message: e.to_string(),
    })?;
    Ok(Key::new(BUILDER_EPOCH).str(kind).bytes(&json).finish())
}

/// Runs `stage` through the cache (see the module docs).
pub fn run<S: Stage>(
    cache: &Cache,
    progress: &Progress,
    stage: &S,
) -> Result<Made<S::Output>, BuildError> {
    let key = key(stage)?;
    let dir = cache.entry(S::KIND, &key);
    progress.stage(S::NAME, || {
        if let Some(output) = stored::<S::Output>(&dir) {
            Cache::touch(&dir);
            let note = stage.note(&output);
            return Ok((Made { dir, key, output }, Outcome::cached(note)));
        }
        // An entry without its output value is from an interrupted or
        // older builder: made again.
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(fsio::at("removing", &dir))?;
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(fsio::at("creating", parent))?;
        let tmp = Cache::temp_for(&dir);
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(fsio::at("creating", &tmp))?;
        let output = match make_into::<S>(stage, &tmp, progress) {
            Ok(output) => output,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &dir).map_err(fsio::at("renaming", &dir))?;
        let note = stage.note(&output);
        Ok((Made { dir, key, output }, Outcome::built(note)))
    })
}

fn make_into<S: Stage>(
    stage: &S,
    tmp: &Path,
    progress: &Progress,
) -> Result<S::Output, BuildError> {
    let output = stage.make(tmp, progress)?;
    let json = serde_json::to_vec_pretty(&output).map_err(|e| BuildError::Inputs {
        stage: S::NAME,
        message: e.to_string(),
    })?;
    let path = tmp.join(OUTPUT);
    fs::write(&path, json).map_err(fsio::at("writing", &path))?;
    Ok(output)
}

fn stored<O: DeserializeOwned>(dir: &Path) -> Option<O> {
    let text = fs::read(dir.join(OUTPUT)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// A file a stage reads: keyed by its sha256, read from its path.
#[derive(Debug, Clone)]
pub struct Content {
    pub path: PathBuf,
    pub sha256: String,
}

impl Content {
    pub fn of(path: &Path) -> Result<Self, fsio::PathError> {
        let sha256 = crate::cache::sha256_file(path).map_err(fsio::at("reading", path))?;
        Ok(Self {
            path: path.to_owned(),
            sha256,
        })
    }

    pub fn read(&self) -> Result<Vec<u8>, BuildError> {
        Ok(fs::read(&self.path).map_err(fsio::at("reading", &self.path))?)
    }
}

impl Serialize for Content {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.sha256)
    }
}

/// The total size of the files under `root`.
pub fn tree_bytes(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A file's length.
pub fn sized(path: &Path) -> Result<u64, BuildError> {
    Ok(fs::metadata(path).map_err(fsio::at("reading", path))?.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Serialize)]
    struct Greeting {
        text: String,
        #[serde(skip)]
        makes: Cell<u32>,
    }

    impl Stage for Greeting {
        const NAME: &'static str = "greeting";
        const KIND: &'static str = "greeting";
        type Output = usize;

        fn make(&self, dir: &Path, _: &Progress) -> Result<usize, BuildError> {
            self.makes.set(self.makes.get() + 1);
            fs::write(dir.join("greeting"), &self.text).map_err(fsio::at("writing", dir))?;
            Ok(self.text.len())
        }

        fn note(&self, output: &usize) -> String {
            format!("{output} bytes")
        }
    }

    fn greeting(text: &str) -> Greeting {
        Greeting {
            text: text.into(),
            makes: Cell::new(0),
        }
    }

    #[test]
    fn a_stage_is_made_once_per_inputs_and_its_output_comes_back_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_owned());
        let progress = Progress::new();
        let hello = greeting("hello");

        let first = run(&cache, &progress, &hello).unwrap();
        let again = run(&cache, &progress, &hello).unwrap();
        let other = run(&cache, &progress, &greeting("hello, world")).unwrap();

        assert_eq!(hello.makes.get(), 1);
        assert_eq!((first.output, again.output, other.output), (5, 5, 12));
        assert_eq!(first.dir, again.dir);
        assert_ne!(first.key, other.key);
        assert_eq!(fs::read_to_string(again.file("greeting")).unwrap(), "hello");
        let cached: Vec<bool> = progress.timings().iter().map(|t| t.cached).collect();
        assert_eq!(cached, [false, true, false]);
    }

    #[test]
    fn an_entry_without_its_output_is_made_again_and_a_failed_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(dir.path().to_owned());
        let progress = Progress::new();
        let hello = greeting("hello");
        let made = run(&cache, &progress, &hello).unwrap();
        fs::remove_file(made.file(OUTPUT)).unwrap();

        run(&cache, &progress, &hello).unwrap();
        assert_eq!(hello.makes.get(), 2);

        // A stage that cannot write its file fails, and no entry is left.
        let blocked = greeting("x");
        let key = key(&blocked).unwrap();
        let entry = cache.entry("greeting", &key);
        struct Failing(Greeting);
        impl Serialize for Failing {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }
        impl Stage for Failing {
            const NAME: &'static str = "greeting";
            const KIND: &'static str = "greeting";
            type Output = usize;
            fn make(&self, dir: &Path, _: &Progress) -> Result<usize, BuildError> {
                fs::write(dir.join("half"), "x").unwrap();
                Err(fsio::at("writing", dir)(std::io::Error::other("disk full")).into())
            }
            fn note(&self, _: &usize) -> String {
                String::new()
            }
        }
        let err = run(&cache, &progress, &Failing(blocked)).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(!entry.exists());
        let leftovers: Vec<_> = fs::read_dir(entry.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
