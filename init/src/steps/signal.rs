//! Telling the stack how the boot went: SignalResource, which each group's
//! CreationPolicy and rolling update wait for (a master signals after its
//! add-ons, a node once it is Ready).

use super::{aws_err, Context, Report, StepError};
use aws_sdk_cloudformation::types::ResourceSignalStatus;

pub const STEP: &str = "signal";
/// The AWS actions a member's signal calls.
pub const CALLS: &[&str] = &["cloudformation:SignalResource"];

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
