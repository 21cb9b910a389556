//! `slipway-vm-bench BASELINE_DIR IMAGE_DIR [ROUNDS]` (`just bench-vm`):
//! brings the cluster up from two built images in turn, baseline first,
//! ROUNDS times (default 1), on the same machine in the same run, each
//! until both members are Ready, then tears it down. Prints, per image,
//! when the master's slipway-init made its boot check, when its API server
//! was ready with the add-ons applied (both after the master's QEMU
//! started) and when both members were Ready (after the first launch),
//! and each figure's ratio to the baseline's: the host's pace moves more
//! between runs than most changes do, so only neighbouring runs compare.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vm_tests::cluster::{Cluster, Options};
use vm_tests::Image;

/// The master's console marks the figures are read from.
const MARKS: [(&str, &str); 2] = [
    ("master: slipway-init's boot check", "SLIPWAY-BOOT-CHECK"),
    (
        "master: API server ready, add-ons applied",
        "the add-ons applied: ",
    ),
];
const BOTH_READY: &str = "both members Ready (after the first launch)";

/// One bring-up's figures, in seconds, in the order of [`MARKS`] then
/// [`BOTH_READY`].
fn bring_up(image_dir: &Path, dir: PathBuf) -> Result<Vec<f64>> {
    let image = Image::at(image_dir.to_path_buf())?;
    let mut cluster = Cluster::create(&image, Options::master_and_node(dir))?;
    let start = Instant::now();
    let master = cluster.launch_master_and_node()?;
    cluster
        .wait_for_ready_nodes(2, Duration::from_secs(30 * 60), || false)
        .with_context(|| format!("the cluster from {}", image_dir.display()))?;
    let both = start.elapsed();
    let vm = cluster
        .vms
        .get(&master)
        .context("the master's VM is gone")?;
    let mut figures = Vec::new();
    for (what, mark) in MARKS {
        let seen = vm
            .seen(mark)
            .with_context(|| format!("the master's console has no {what:?} ({mark:?})"))?;
        figures.push(seen.as_secs_f64());
    }
    figures.push(both.as_secs_f64());
    Ok(figures)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Runs one bring-up in a process of its own (the harness's network
/// namespace and forwarders belong to the process that made them) and
/// reads its figures from the last line of its standard output.
fn bring_up_apart(image_dir: &Path, dir: &Path) -> Result<Vec<f64>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--one")
        .arg(image_dir)
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running a bring-up")?;
    if !out.status.success() {
        bail!(
            "the bring-up from {} failed ({})",
            image_dir.display(),
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("FIGURES "))
        .context("the bring-up printed no figures")?;
    line.split_whitespace()
        .map(|f| f.parse::<f64>().context("a figure that is not a number"))
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--one") {
        let (Some(image), Some(dir)) = (args.get(2), args.get(3)) else {
            bail!("usage: slipway-vm-bench --one IMAGE_DIR WORK_DIR");
        };
        let figures = bring_up(Path::new(image), PathBuf::from(dir))?;
        let listed: Vec<String> = figures.iter().map(|f| format!("{f:.1}")).collect();
        println!("FIGURES {}", listed.join(" "));
        return Ok(());
    }
    let (Some(baseline), Some(image)) = (args.get(1), args.get(2)) else {
        bail!("usage: slipway-vm-bench BASELINE_IMAGE_DIR IMAGE_DIR [ROUNDS]");
    };
    let rounds: usize = match args.get(3) {
        Some(n) => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("ROUNDS must be a positive whole number, not {n:?}"))?,
        None => 1,
    };
    let images = [
        ("baseline", PathBuf::from(baseline)),
        ("this", PathBuf::from(image)),
    ];
    // Beside the kept consoles: each bring-up's disks and logs.
    let work = vm_tests::vm_logs_dir().with_file_name("vm-bench");
    let mut runs: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (i, (label, dir)) in images.iter().enumerate() {
            eprintln!(
                "[bench] round {round} of {rounds}: {label} ({})",
                dir.display()
            );
            let dir_for_run = work.join(format!("{label}-{round}"));
            let _ = std::fs::remove_dir_all(&dir_for_run);
            let figures = bring_up_apart(dir, &dir_for_run)?;
            eprintln!("[bench]   {figures:.1?}");
            runs[i].push(figures);
        }
    }
    let names: Vec<&str> = MARKS.iter().map(|(n, _)| *n).chain([BOTH_READY]).collect();
    println!(
        "\n{:<48} {:>20} {:>20} {:>6}",
        "figure (s)", "baseline (mean)", "this (mean)", "ratio"
    );
    for (f, name) in names.iter().enumerate() {
        let column = |runs: &Vec<Vec<f64>>| -> (String, f64) {
            let xs: Vec<f64> = runs.iter().map(|r| r[f]).collect();
            let listed: Vec<String> = xs.iter().map(|x| format!("{x:.1}")).collect();
            (
                format!("{} ({:.1})", listed.join(" "), mean(&xs)),
                mean(&xs),
            )
        };
        let (a, am) = column(&runs[0]);
        let (b, bm) = column(&runs[1]);
        println!("{name:<48} {a:>20} {b:>20} {:>6.2}", bm / am);
    }
    Ok(())
}
