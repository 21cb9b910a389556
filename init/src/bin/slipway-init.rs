//! `slipway-init`: runs on every boot, before the container runtime and kubelet.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn")),
        )
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    tracing::info!("slipway-init {} starting", env!("CARGO_PKG_VERSION"));
    match slipway_init::run(&slipway_init::Context::default()) {
        Ok(check) => {
            println!("SLIPWAY-BOOT-CHECK {check}");
            println!("SLIPWAY-INIT-DONE");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            println!("SLIPWAY-INIT-FAILED {msg}");
            tracing::error!("{msg}");
            ExitCode::FAILURE
        }
    }
}
