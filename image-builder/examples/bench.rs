//! `just bench`: times a cold build (empty stage cache, downloads cached),
//! an overlay-only rebuild (one unit file changed) and a no-op rebuild,
//! stage by stage, and reports the sizes of root, ESP and disk and the
//! bytes a publish uploads, each beside the previous run's. Runs the real
//! `image-builder` binary against a scratch copy of the spec. Given
//! `--baseline PATH` (another build of `image-builder`, e.g. from an earlier
//! commit), it runs the same three builds with it first, on the same
//! machine in the same run, and prints each time beside the baseline's.

use image_builder::manifest::Manifest;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Copies a tree, links as links (the image's unit masks are links to
/// /dev/null).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let kind = e.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path())?, to.join(e.file_name()))?;
        } else if kind.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

fn build(
    builder: &Path,
    spec: &Path,
    out: &Path,
    bin_dir: &Path,
    cache: &Path,
) -> Result<(f64, Manifest), String> {
    let t0 = Instant::now();
    let status = Command::new(builder)
        .arg("build")
        .arg("--spec")
        .arg(spec)
        .arg("--out")
        .arg(out)
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--cache-dir")
        .arg(cache)
        .status()
        .map_err(|e| format!("running {}: {e}", builder.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("build failed: {status}"));
    }
    let text = fs::read_to_string(out.join("build-manifest.json")).map_err(|e| e.to_string())?;
    let m = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok((secs, m))
}

/// The three builds' wall times and the manifests of the first two.
struct Timed {
    cold: f64,
    overlay: f64,
    noop: f64,
    m_cold: Manifest,
    m_overlay: Manifest,
    /// The scratch copy (spec, cache, out), kept while it is read.
    scratch: tempfile::TempDir,
}

/// A cold, an overlay-only and a no-op build with `builder` in a scratch
/// copy of the repository's spec whose stage cache starts empty.
fn three_builds(builder: &Path, bin_dir: &Path, label: &str) -> Result<Timed, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let user_cache = image_builder::cache::Cache::locate(None);
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let s = scratch.path();
    for f in ["image.toml", "image.lock"] {
        fs::copy(repo.join(f), s.join(f)).map_err(|e| format!("{f}: {e}"))?;
    }
    for d in ["units", "manifests", "rootfs"] {
        copy_dir(&repo.join(d), &s.join(d)).map_err(|e| format!("{d}: {e}"))?;
    }
    // A fresh stage cache that shares only the downloads (the content
    // store; `debs/` too, where an older builder kept its packages).
    let cache = s.join("cache");
    fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    for shared in ["blobs", "debs"] {
        if user_cache.root().join(shared).exists() {
            std::os::unix::fs::symlink(user_cache.root().join(shared), cache.join(shared))
                .map_err(|e| e.to_string())?;
        }
    }
    let spec = s.join("image.toml");
    let out = s.join("out");

    eprintln!("== {label}: cold build (downloads cached, no stage cached)");
    let (cold, m_cold) = build(builder, &spec, &out, bin_dir, &cache)?;
    let unit = s.join("units/slipway-init.service");
    let mut text = fs::read_to_string(&unit).map_err(|e| e.to_string())?;
    text.push_str("# bench: overlay change\n");
    fs::write(&unit, text).map_err(|e| e.to_string())?;
    eprintln!("== {label}: overlay-only rebuild (one unit changed)");
    let (overlay, m_overlay) = build(builder, &spec, &out, bin_dir, &cache)?;
    eprintln!("== {label}: no-op rebuild");
    let (noop, _) = build(builder, &spec, &out, bin_dir, &cache)?;
    Ok(Timed {
        cold,
        overlay,
        noop,
        m_cold,
        m_overlay,
        scratch,
    })
}

fn print_stages(label: &str, t: &Timed) {
    println!(
        "\n{label}\n{:<18} {:>10} {:>14}",
        "stage", "cold (s)", "overlay (s)"
    );
    for c in &t.m_cold.stages {
        let o = t.m_overlay.stages.iter().find(|x| x.stage == c.stage);
        let o = o.map_or("-".to_owned(), |o| {
            format!("{:.2}{}", o.seconds, if o.cached { " c" } else { "" })
        });
        println!("{:<18} {:>10.2} {:>14}", c.stage, c.seconds, o);
    }
    println!(
        "{:<18} {:>10.2} {:>14.2}",
        "total (wall)", t.cold, t.overlay
    );
    println!("no-op rebuild (wall): {:.2} s", t.noop);
}

fn main() -> Result<(), String> {
    let builder = PathBuf::from(arg("--builder").ok_or("--builder PATH is required")?);
    let bin_dir = PathBuf::from(arg("--bin-dir").ok_or("--bin-dir DIR is required")?);
    let baseline = arg("--baseline")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");

    let before = match &baseline {
        Some(b) => Some(three_builds(b, &bin_dir, "baseline")?),
        None => None,
    };
    let now = three_builds(&builder, &bin_dir, "this builder")?;
    if let Some(before) = &before {
        print_stages(
            &format!(
                "baseline ({})",
                baseline
                    .as_ref()
                    .map_or(String::new(), |b| b.display().to_string())
            ),
            before,
        );
    }
    print_stages("this builder", &now);
    if let Some(before) = &before {
        println!(
            "\n{:<24} {:>10} {:>10} {:>6}",
            "wall time (s)", "this", "baseline", "ratio"
        );
        for (name, this, base) in [
            ("cold build", now.cold, before.cold),
            ("overlay-only rebuild", now.overlay, before.overlay),
            ("no-op rebuild", now.noop, before.noop),
        ] {
            println!("{name:<24} {this:>10.2} {base:>10.2} {:>6.2}", this / base);
        }
    }
    let m_cold = &now.m_cold;
    let out = now.scratch.path().join("out");
    let part = |label: &str| {
        m_cold
            .partitions
            .iter()
            .find(|p| p.label == label)
            .map_or(0, |p| p.content_size)
    };
    // What `image-builder publish` sends: the disk's blocks that are not
    // all zeros.
    let disk = out.join(&m_cold.disk.file);
    let upload = image_builder::publish::snapshot::nonzero_blocks(&disk)
        .map_err(|e| e.to_string())?
        .len() as u64
        * image_builder::publish::snapshot::BLOCK_SIZE;
    let sizes = [
        ("root tree (files)", m_cold.root_tree_bytes),
        ("root EROFS", part("slipway-root")),
        ("verity tree", part("slipway-root-verity")),
        ("UKI", m_cold.uki_size),
        ("ESP", part("esp")),
        ("var (in the image)", part("slipway-var")),
        ("disk, raw", m_cold.disk.size),
        ("disk, qcow2", m_cold.qcow2.size),
        ("bytes a publish uploads", upload),
    ];
    print_sizes(&repo.join("target/bench/build-sizes.json"), &sizes);
    print_vm_figures(&repo.join("target/bench/vm-figures.json"));
    Ok(())
}

/// Prints `sizes` in MiB beside the ones the previous bench measured (kept
/// in `path`), then keeps these for the next.
fn print_sizes(path: &Path, sizes: &[(&str, u64)]) {
    let previous: serde_json::Map<String, serde_json::Value> = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mib = |b: f64| b / f64::from(1 << 20);
    println!(
        "\n{:<28} {:>10} {:>10} {:>6}",
        "size (MiB)", "last", "previous", "ratio"
    );
    let mut now = serde_json::Map::new();
    for (name, bytes) in sizes {
        let bytes = *bytes as f64;
        let (before, ratio) = match previous.get(*name).and_then(serde_json::Value::as_f64) {
            Some(p) if p > 0.0 => (format!("{:.1}", mib(p)), format!("{:.2}", bytes / p)),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        println!("{name:<28} {:>10.1} {before:>10} {ratio:>6}", mib(bytes));
        now.insert((*name).to_owned(), serde_json::json!(bytes));
    }
    let written = path
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(path, serde_json::to_vec_pretty(&now).unwrap_or_default()));
    if let Err(e) = written {
        eprintln!(
            "warning: could not keep the sizes in {}: {e}",
            path.display()
        );
    }
}

/// The boot figures the VM tests recorded at their last run, each beside
/// the one it replaced (`just vm-test` or `just test` refreshes them).
fn print_vm_figures(path: &Path) {
    let figures: serde_json::Map<String, serde_json::Value> = match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(_) => {
            println!(
                "\nno VM figures yet ({}): run `just vm-test` or `just test`",
                path.display()
            );
            return;
        }
    };
    println!(
        "\n{:<72} {:>9} {:>9} {:>6}",
        "VM figure (s after QEMU start, or duration)", "last", "previous", "ratio"
    );
    for (name, f) in &figures {
        let last = f["seconds"].as_f64().unwrap_or(f64::NAN);
        let (previous, ratio) = match f["previous"].as_f64() {
            Some(p) if p > 0.0 => (format!("{p:.1}"), format!("{:.2}", last / p)),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        println!("{name:<72} {last:>9.1} {previous:>9} {ratio:>6}");
    }
}
