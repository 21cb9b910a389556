//! Telling others how the boot went: systemd through `sd_notify`, and
//! CloudFormation through SignalResource, which each group's
//! CreationPolicy and rolling update wait for (a master signals after its
//! add-ons, a node once it is Ready).

use super::{aws_err, Context, Report, StepError};
use aws_sdk_cloudformation::types::ResourceSignalStatus;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

pub const STEP: &str = "signal";
/// The AWS actions a member's signal calls.
pub const CALLS: &[&str] = &["cloudformation:SignalResource"];

/// Sends `state` (e.g. `READY=1`) to systemd's notification socket, if any.
pub fn notify(socket: Option<&str>, state: &str) -> Result<bool, StepError> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound().map_err(|e| StepError::Invalid {
        what: "sd_notify".into(),
        message: e.to_string(),
    })?;
    let sent =
        if let Some(name) = socket.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(|e| StepError::Invalid {
                    what: "sd_notify".into(),
                    message: e.to_string(),
                })?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), Path::new(socket))
        };
    sent.map_err(|e| StepError::Invalid {
        what: format!("sd_notify to {socket}"),
        message: e.to_string(),
    })?;
    Ok(true)
}

/// Signals the stack, when the config names one.
pub async fn cloudformation(ctx: &Context, success: bool) -> Result<Option<Report>, StepError> {
    let Some(signal) = &ctx.config.signal else {
        return Ok(None);
    };
    let status = if success {
        ResourceSignalStatus::Success
    } else {
        ResourceSignalStatus::Failure
    };
    ctx.aws
        .cfn
        .signal_resource()
        .stack_name(&signal.stack)
        .logical_resource_id(&signal.resource)
        .unique_id(&ctx.instance.id)
        .status(status.clone())
        .send()
        .await
        .map_err(aws_err(
            "cloudformation:SignalResource",
            format!("signalling {} of stack {}", signal.resource, signal.stack),
        ))?;
    Ok(Some(Report::changed(
        STEP,
        format!(
            "signalled {status:?} to {} of {}",
            signal.resource, signal.stack
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_socket_and_is_quiet_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        assert!(notify(Some(path.to_str().unwrap()), "READY=1").unwrap());
        let mut buf = [0u8; 32];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!notify(None, "READY=1").unwrap());
    }
}
