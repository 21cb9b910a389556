//! Slipway's boot-time code: the initramfs that opens the verity-protected
//! root, and `slipway-init`, which runs on every boot and turns the generic
//! image into a master or a node.

#[cfg(feature = "node")]
pub mod aws;
pub mod bootcheck;
#[cfg(feature = "node")]
pub mod config;
#[cfg(feature = "node")]
pub mod containerd;
pub mod contract;
pub mod dm;
pub mod grow;
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
#[cfg(feature = "sdk")]
pub mod sdk;
#[cfg(feature = "node")]
pub mod steps;
pub mod verity;

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
