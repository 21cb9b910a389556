//! The API server's name inside the VPC (`api_name`): a record in the
//! stack's private hosted zone that each master points at its own zone's
//! reserved address as it boots, so kubelets and kube-proxy follow the
//! master from zone to zone without being told.
//!
//! The template owns the zone and no record in it: Route 53 deletes a
//! record only given its current values, and refuses to delete a zone that
//! still holds one, so a record CloudFormation made and the master changed
//! would stop the stack's deletion. The master's departure deletes the
//! record instead, when (and only when) its stack is being deleted; a
//! master that is merely replaced leaves it in place for its successor to
//! change.

use super::{aws_err, Master, Report, StepError};
use aws_sdk_cloudformation::types::StackStatus;
use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ResourceRecord, ResourceRecordSet, RrType,
};
use std::net::Ipv4Addr;

pub const STEP: &str = "api-record";
/// The AWS actions the boot calls here.
pub const CALLS: &[&str] = &["route53:ChangeResourceRecordSets"];
/// And those the departure calls.
pub const LEAVE_CALLS: &[&str] = &[
    "cloudformation:DescribeStacks",
    "route53:ChangeResourceRecordSets",
];

/// Seconds a resolver may keep the answer: how long after a master's
/// replacement in another zone a client may still dial the old address.
pub const TTL: i64 = 30;

/// A request the SDK's builders refused (a required field missing).
fn invalid(e: aws_sdk_route53::error::BuildError) -> StepError {
    StepError::Invalid {
        what: STEP.into(),
        message: e.to_string(),
    }
}

fn change(action: ChangeAction, name: &str, ip: Ipv4Addr) -> Result<Change, StepError> {
    let record = ResourceRecordSet::builder()
        .name(name)
        .r#type(RrType::A)
        .ttl(TTL)
        .resource_records(
            ResourceRecord::builder()
                .value(ip.to_string())
                .build()
                .map_err(invalid)?,
        )
        .build()
        .map_err(invalid)?;
    Change::builder()
        .action(action)
        .resource_record_set(record)
        .build()
        .map_err(invalid)
}

async fn send(
    ctx: &Master<'_>,
    action: ChangeAction,
    ip: Ipv4Addr,
    why: &str,
) -> Result<(), StepError> {
    let zone = &ctx.settings.dns_zone;
    let name = &ctx.config.api_name;
    let batch = ChangeBatch::builder()
        .comment(why)
        .changes(change(action.clone(), name, ip)?)
        .build()
        .map_err(invalid)?;
    ctx.aws
        .route53
        .change_resource_record_sets()
        .hosted_zone_id(zone)
        .change_batch(batch)
        .send()
        .await
        .map_err(aws_err(
            "route53:ChangeResourceRecordSets",
            format!("{action} {name} A {ip} in hosted zone {zone}"),
        ))?;
    Ok(())
}

/// Points `api_name` at this master's address. An UPSERT: Route 53 leaves
/// a record that already holds the address as it is, so a reboot or a
/// replacement in the same zone changes nothing and one in another zone
/// moves the name. (Reading the record first would cost a grant and a call
/// for no different outcome.)
pub async fn run(ctx: &Master<'_>) -> Result<Report, StepError> {
    let ip = ctx.ip;
    let name = &ctx.config.api_name;
    let why = format!("{} took over the API", ctx.instance.id);
    send(ctx, ChangeAction::Upsert, ip, &why).await?;
    Ok(Report::changed(
        STEP,
        format!("{name} -> {ip} (TTL {TTL}s)"),
    ))
}

/// Whether the stack this master belongs to is being deleted.
async fn stack_deleting(ctx: &super::Context) -> Result<bool, StepError> {
    let Some(signal) = &ctx.config.signal else {
        return Ok(false);
    };
    let out = ctx
        .aws
        .cfn
        .describe_stacks()
        .stack_name(&signal.stack)
        .send()
        .await
        .map_err(aws_err(
            "cloudformation:DescribeStacks",
            format!("looking up stack {}", signal.stack),
        ))?;
    Ok(out
        .stacks()
        .iter()
        .any(|s| s.stack_status() == Some(&StackStatus::DeleteInProgress)))
}

/// Deletes the record this master set (Route 53 deletes a record only
/// given its current values: this master's address and [`TTL`]).
pub async fn delete(ctx: &Master<'_>) -> Result<(), StepError> {
    let ip = ctx.ip;
    let why = format!("{} left with its stack", ctx.instance.id);
    send(ctx, ChangeAction::Delete, ip, &why).await
}

/// At a master's departure: deletes the record if the stack is being
/// deleted (so CloudFormation can delete the zone), and otherwise leaves
/// it for the next master. Says what it did.
pub async fn leave(ctx: &Master<'_>) -> Result<String, StepError> {
    if !stack_deleting(ctx).await? {
        return Ok(format!("{} kept for the next master", ctx.config.api_name));
    }
    delete(ctx).await?;
    Ok(format!(
        "{} deleted (the stack is being deleted)",
        ctx.config.api_name
    ))
}
