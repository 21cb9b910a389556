//! Figures the VM tests measure (how long a boot takes to each point),
//! kept in `target/bench/vm-figures.json` for `just bench`, which prints
//! them beside the figure each replaced. A figure is recorded when a test
//! measures it, so the file holds the latest run of each test.

use serde_json::{json, Map, Value};
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

/// Where the figures are kept (`just bench` reads them there).
fn path() -> PathBuf {
    crate::workspace_dir().join("target/bench/vm-figures.json")
}

/// Records `figures` (name, time after QEMU started), each keeping the value
/// it replaces as `previous`. Failing to write is reported, not fatal: the
/// figures are for a person, the test's verdict does not depend on them.
pub fn record<S: AsRef<str>>(figures: &[(S, Duration)]) {
    let path = path();
    let mut all: Map<String, Value> = fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (name, took) in figures {
        let name = name.as_ref();
        let previous = all.get(name).and_then(|f| f["seconds"].as_f64());
        let seconds = (took.as_secs_f64() * 10.0).round() / 10.0;
        all.insert(
            name.to_owned(),
            json!({"seconds": seconds, "previous": previous}),
        );
    }
    let written = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(&path, serde_json::to_vec_pretty(&all).unwrap_or_default()));
    if let Err(e) = written {
        eprintln!(
            "warning: could not record figures in {}: {e}",
            path.display()
        );
    }
}
