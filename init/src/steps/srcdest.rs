//! Turns off the instance's source/destination check, which the overlay
//! network needs (pods' addresses are not the instance's own).

use super::{aws_err, Context, Report, StepError};
use aws_sdk_ec2::types::{AttributeBooleanValue, InstanceAttributeName};

pub const STEP: &str = "source-dest-check";
/// The AWS actions this step calls (checked against the template's grants).
pub const CALLS: &[&str] = &[
    "ec2:DescribeInstanceAttribute",
    "ec2:ModifyInstanceAttribute",
];

pub async fn run(ctx: &Context) -> Result<Report, StepError> {
    let id = &ctx.instance.id;
    let attr = ctx
        .aws
        .ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(InstanceAttributeName::SourceDestCheck)
        .send()
        .await
        .map_err(aws_err(
            "ec2:DescribeInstanceAttribute",
            format!("reading the source/destination check of {id}"),
        ))?;
    if attr.source_dest_check().and_then(|v| v.value()) == Some(false) {
        return Ok(Report::already(
            STEP,
            format!("source/destination check of {id} is off"),
        ));
    }
    ctx.aws
        .ec2
        .modify_instance_attribute()
        .instance_id(id)
        .source_dest_check(AttributeBooleanValue::builder().value(false).build())
        .send()
        .await
        .map_err(aws_err(
            "ec2:ModifyInstanceAttribute",
            format!("turning off the source/destination check of {id}"),
        ))?;
    Ok(Report::changed(
        STEP,
        format!("turned off the source/destination check of {id}"),
    ))
}
