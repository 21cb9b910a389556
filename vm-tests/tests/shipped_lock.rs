//! The shipped `payload.lock` against the fixtures (`just fixtures`): a
//! check through the fixtures' artifact mirror and registry resolves every
//! production entry, and each differs from its production pin only by the
//! bytes the fixtures built here, which are exactly the fixtures' own pins.
//! Upstream's servers are not reached; the fixtures stand in for them, for
//! the architecture they are built for (amd64; the lock's arm64 pins are
//! checked against the published values only, by `shipped_pins`).

use anyhow::{Context, Result};
use image_builder::cache::Cache;
use image_builder::payload::{self, Lock, Mirrors, Mismatch};
use image_builder::spec::Spec;
use vm_tests::registry::Registry;
use vm_tests::{cache_dir, workspace_dir};

#[test]
fn the_shipped_lock_resolves_every_entry_through_the_fixture_mirrors() -> Result<()> {
    let repo = workspace_dir();
    let fixtures = cache_dir().join("fixtures");
    let fixture_lock = Lock::load(&fixtures.join("payload.lock"))
        .context("the fixtures' pins: run `just fixtures`")?;
    let spec = Spec::load(&repo.join("image.toml"))?;
    let images = payload::load_images(&repo.join("manifests/images.toml"))?;
    let shipped = Lock::load(&repo.join("payload.lock"))?;
    let registry = Registry::start_with(Some(&fixtures.join("registry")))?;
    let mirrors = Mirrors {
        artifacts: Some(format!("file://{}", fixtures.join("artifacts").display())),
        registry: Some(format!("http://{}", registry.host)),
    };
    let cache = tempfile::tempdir()?;

    let found = payload::check(
        &Cache::at(cache.path().to_owned()),
        &spec.payload.artifacts,
        &images,
        &shipped,
        &mirrors,
        &["amd64"],
        &|_| {},
    );

    let total = spec.payload.artifacts.len() + payload::unique_references(&images).len();
    assert_eq!(found.len(), total, "every entry differs: {found:#?}");
    for m in &found {
        let Mismatch::Differs {
            what,
            expected,
            actual,
            ..
        } = m
        else {
            panic!("not resolved through the fixtures: {m}");
        };
        let (fixture, production) = match what.strip_prefix("image ") {
            Some(reference) => (
                fixture_lock.image(reference).map(|p| &p.digest),
                shipped.image(reference).map(|p| &p.digest),
            ),
            None => {
                let fields: Vec<&str> = what.trim_start_matches("artifact ").split(' ').collect();
                let [name, version, arch] = fields[..] else {
                    panic!("not an artifact's name, version and architecture: {what}");
                };
                (
                    fixture_lock
                        .artifact(name, version, arch)
                        .map(|p| &p.sha256),
                    shipped.artifact(name, version, arch).map(|p| &p.sha256),
                )
            }
        };
        assert_eq!(Some(actual), fixture, "{m}");
        assert_eq!(Some(expected), production, "{m}");
    }
    Ok(())
}
