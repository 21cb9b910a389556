//! Associates the master's Elastic IP with this instance, taking it over
//! from a dead predecessor if need be.

use super::{aws_err, Master, Report, StepError};
use std::net::Ipv4Addr;

pub const STEP: &str = "elastic-ip";
/// The AWS actions this step calls (checked against the template's grants).
pub const CALLS: &[&str] = &["ec2:DescribeAddresses", "ec2:AssociateAddress"];

/// Returns the report and the address's public IP.
pub async fn run(ctx: &Master<'_>) -> Result<(Report, Ipv4Addr), StepError> {
    let alloc = &ctx.settings.eip_allocation;
    let id = &ctx.instance.id;
    let found = ctx
        .aws
        .ec2
        .describe_addresses()
        .allocation_ids(alloc)
        .send()
        .await
        .map_err(aws_err(
            "ec2:DescribeAddresses",
            format!("looking up Elastic IP {alloc}"),
        ))?;
    let address = found
        .addresses()
        .first()
        .ok_or_else(|| StepError::Invalid {
            what: STEP.into(),
            message: format!("Elastic IP {alloc} does not exist"),
        })?;
    let public_ip: Ipv4Addr = address
        .public_ip()
        .unwrap_or_default()
        .parse()
        .map_err(|_| StepError::Invalid {
            what: STEP.into(),
            message: format!("Elastic IP {alloc} has no IPv4 address"),
        })?;
    // Some APIs report an unassociated address with an empty instance ID.
    let holder = address.instance_id().filter(|i| !i.is_empty());
    if holder == Some(id.as_str()) {
        return Ok((
            Report::already(STEP, format!("{public_ip} ({alloc}) is on {id}")),
            public_ip,
        ));
    }
    let previous = holder.map(str::to_owned);
    ctx.aws
        .ec2
        .associate_address()
        .allocation_id(alloc)
        .instance_id(id)
        .allow_reassociation(true)
        .send()
        .await
        .map_err(aws_err(
            "ec2:AssociateAddress",
            format!("associating Elastic IP {alloc} with {id}"),
        ))?;
    let from = previous
        .map(|p| format!(" (taken over from {p})"))
        .unwrap_or_default();
    Ok((
        Report::changed(
            STEP,
            format!("associated {public_ip} ({alloc}) with {id}{from}"),
        ),
        public_ip,
    ))
}
