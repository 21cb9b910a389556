//! Slipway's boot-time code: the initramfs that opens the verity-protected
//! root, and `slipway-init`, which runs on every boot and turns the generic
//! image into a master or a node.

#[cfg(feature = "node")]
pub mod aws;
pub mod bootcheck;
#[cfg(feature = "node")]
pub mod config;
pub mod dm;
#[cfg(feature = "node")]
pub mod imds;
pub mod initrd;
pub mod layout;
#[cfg(feature = "node")]
pub mod pki;
#[cfg(feature = "node")]
pub mod render;
#[cfg(feature = "node")]
pub mod retry;
#[cfg(feature = "node")]
pub mod steps;
pub mod verity;

use std::path::Path;

/// An error and its causes joined by `sep`, skipping a cause whose text the
/// message already carries (many errors print their source themselves).
pub fn error_chain(err: &dyn std::error::Error, sep: &str) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(sep);
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// What `slipway-init` does on this boot.
#[derive(Debug)]
pub struct Context<'a> {
    pub proc: &'a Path,
    pub sys: &'a Path,
    pub var: &'a Path,
    pub run: &'a Path,
}

impl Default for Context<'static> {
    fn default() -> Self {
        Self {
            proc: Path::new("/proc"),
            sys: Path::new("/sys"),
            var: Path::new("/var"),
            run: Path::new("/run"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("boot check failed: {0}")]
    BootCheck(bootcheck::BootCheck),
    #[error("marking the boot done in {path}: {source}")]
    MarkDone {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs this boot's steps. For now: report the boot's shape and mark it done.
pub fn run(ctx: &Context<'_>) -> Result<bootcheck::BootCheck, InitError> {
    let check = bootcheck::BootCheck::inspect(ctx.proc, ctx.sys, ctx.var);
    tracing::info!(step = "boot-check", "{check}");
    if !check.all_ok() {
        return Err(InitError::BootCheck(check));
    }
    let dir = ctx.run.join("slipway");
    let done = dir.join("init.done");
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&done, b"done\n"))
        .map_err(|source| InitError::MarkDone {
            path: done.display().to_string(),
            source,
        })?;
    tracing::info!(step = "done", "marked {}", done.display());
    Ok(check)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Silent(#[source] std::io::Error);

    #[test]
    fn error_chain_adds_only_causes_not_already_said() {
        let io = || std::io::Error::other("disk on fire");
        assert_eq!(
            super::error_chain(&Repeats(io()), ": "),
            "outer: disk on fire"
        );
        assert_eq!(
            super::error_chain(&Silent(io()), " / "),
            "outer / disk on fire"
        );
    }
}
