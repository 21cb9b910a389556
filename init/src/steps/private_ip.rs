//! The master's stable private IP: the address its stack reserves in the
//! master's zone, which the API's name points at (see `api_record`).
//! Assigned to this instance's primary network interface (taken from a
//! dead predecessor if need be) and configured on the host interface.

use super::{aws_err, Master, Report, StepError};

pub const STEP: &str = "private-ip";
/// The AWS actions this step calls (checked against the template's grants).
pub const CALLS: &[&str] = &["ec2:DescribeInstances", "ec2:AssignPrivateIpAddresses"];

/// The interface carrying the default route, from `/proc/net/route`.
pub fn default_interface(route_table: &str) -> Option<String> {
    route_table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 2 && fields[1] == "00000000").then(|| fields[0].to_owned())
    })
}

pub async fn run(ctx: &Master<'_>) -> Result<Report, StepError> {
    let ip = ctx.ip.to_string();
    let id = &ctx.instance.id;
    let described = ctx
        .aws
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(aws_err("ec2:DescribeInstances", format!("looking up {id}")))?;
    let eni = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .flat_map(|i| i.network_interfaces())
        .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0))
        .ok_or_else(|| StepError::Invalid {
            what: STEP.into(),
            message: format!("{id} has no primary network interface"),
        })?;
    let eni_id = eni.network_interface_id().unwrap_or_default().to_owned();
    let has_ip = eni
        .private_ip_addresses()
        .iter()
        .any(|a| a.private_ip_address() == Some(ip.as_str()));
    let mut did = Vec::new();
    if !has_ip {
        ctx.aws
            .ec2
            .assign_private_ip_addresses()
            .network_interface_id(&eni_id)
            .private_ip_addresses(&ip)
            .allow_reassignment(true)
            .send()
            .await
            .map_err(aws_err(
                "ec2:AssignPrivateIpAddresses",
                format!("assigning {ip} to {eni_id} of {id}"),
            ))?;
        did.push(format!("assigned {ip} to {eni_id}"));
    }
    let routes = std::fs::read_to_string(ctx.paths.proc.join("net/route")).unwrap_or_default();
    let iface = default_interface(&routes).ok_or_else(|| StepError::Invalid {
        what: STEP.into(),
        message: "no interface carries the default route".into(),
    })?;
    let addrs = ctx
        .runner
        .run("ip", &["-o", "-4", "addr", "show", "dev", &iface])?;
    if !addrs
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(ip.as_str()))
    {
        ctx.runner
            .run("ip", &["addr", "add", &format!("{ip}/32"), "dev", &iface])?;
        did.push(format!("configured {ip} on {iface}"));
    }
    Ok(if did.is_empty() {
        Report::already(STEP, format!("{ip} is on {eni_id} and {iface}"))
    } else {
        Report::changed(STEP, did.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_names_the_interface() {
        let table = "Iface\tDestination\tGateway\tFlags\nens5\t0001000A\t00000000\t0001\nens5\t00000000\t0101000A\t0003\n";
        assert_eq!(default_interface(table).as_deref(), Some("ens5"));
        assert_eq!(default_interface("Iface\tDestination\n"), None);
    }
}
