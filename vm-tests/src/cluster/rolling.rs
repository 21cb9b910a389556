//! A release update as AWS performs it, played by the harness. This is a
//! stand-in: moto's CloudFormation accepts the next release's template as
//! a stack update, but it neither makes the launch templates' new versions
//! nor rolls the Auto Scaling groups through them, and it ignores signals.
//!
//! [`Cluster::update_stack`] does CloudFormation's part: moto takes the
//! template, then the harness creates the launch template versions the
//! release implies (its AMI and its release tags) and points each group at
//! them. The test then plays each group's rolling update as the template's
//! `UpdatePolicy` says ([`Cluster::roll`], batch by batch):
//! [`Cluster::retire`] takes a batch down the way EC2 terminates instances
//! (the ACPI power button, a grace, then terminated in the group), the
//! group launches the replacements from the new version, and
//! [`Cluster::signalled`] waits, within `PauseTime`, for each one's SUCCESS
//! signal among the calls the members made. The group never holds more
//! instances than before the update (for the master's: never two).

use super::{physical_id, say, Cluster, Role, STACK};
use crate::cluster::REGION;
use anyhow::{bail, Context, Result};
use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMetadataOptionsRequest, LaunchTemplateTagSpecificationRequest,
    RequestLaunchTemplateData, ResponseLaunchTemplateData, Tag,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A group's `UpdatePolicy.AutoScalingRollingUpdate`, with the stack's
/// parameters filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollingUpdate {
    pub max_batch: usize,
    pub min_in_service: usize,
    /// How long the group waits for each new instance's signal.
    pub pause: Duration,
    pub wait_on_signals: bool,
}

/// An instance [`Cluster::retire`] took out of service.
#[derive(Debug, Clone)]
pub struct Retired {
    pub id: String,
    /// How long its guest took to shut down; `None` if it had to be killed.
    pub shutdown: Option<Duration>,
    /// Its console, to the end.
    pub console: String,
    /// Where in `console` its shutdown began (the power button).
    pub departure_from: usize,
    /// The longest its console printed nothing from the power button on.
    pub silence: Duration,
}

/// What a guest kernel prints as it dies of a fault (the emulator's, as
/// seen under TCG: an oops while patching its own code, a double fault).
const KERNEL_FAULTS: &[&str] = &[
    "Kernel panic - not syncing",
    "Oops: ",
    "int3: ",
    "double fault: ",
    "general protection fault",
    "invalid opcode: ",
    "BUG: unable to handle",
];

impl Retired {
    /// What its console printed from the power button on. (The console
    /// is read lossily: a character still being written when the button
    /// was pressed may have grown since, so the cut moves back to the
    /// nearest character boundary.)
    pub fn departure(&self) -> &str {
        let mut from = self.departure_from.min(self.console.len());
        while !self.console.is_char_boundary(from) {
            from -= 1;
        }
        &self.console[from..]
    }

    /// The first line of its departure in which the guest's kernel died of
    /// a fault, if it did.
    pub fn kernel_fault(&self) -> Option<&str> {
        self.departure()
            .lines()
            .find(|l| KERNEL_FAULTS.iter().any(|f| l.contains(f)))
    }

    /// Why its guest counts as frozen or dead by the emulator's fault, if
    /// it does: its kernel died of a fault, or its console printed nothing
    /// for as long as a live guest never is silent (a departure logs at
    /// least every minute or so).
    pub fn emulator_fault(&self) -> Option<String> {
        if let Some(fault) = self.kernel_fault() {
            return Some(format!("its kernel died as it shut down ({fault})"));
        }
        (self.silence >= super::GUEST_SILENCE).then(|| {
            format!(
                "its console printed nothing for {}s as it shut down",
                self.silence.as_secs()
            )
        })
    }

    /// Ok if its guest powered off within the `grace` it had, the one
    /// [`super::Cluster::retire`] gave it; an emulator fault if it froze.
    pub fn shut_down(&self, grace: Duration) -> Result<()> {
        if self.shutdown.is_some() {
            return Ok(());
        }
        match self.emulator_fault() {
            Some(why) => bail!("{}: {}: {why}", super::EMULATOR_FAULT, self.id),
            None => bail!("{} did not shut down within {grace:?}", self.id),
        }
    }

    /// Ok if its departure printed every one of `markers` (what leaving
    /// cleanly logs); otherwise an error naming what did not show, the
    /// departure's slipway lines and its last lines, as an emulator fault
    /// if its guest froze or its kernel died.
    pub fn left_cleanly(&self, markers: &[&str]) -> Result<()> {
        let departure = self.departure();
        let missing: Vec<&str> = markers
            .iter()
            .copied()
            .filter(|m| !departure.contains(m))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let ours: Vec<&str> = departure
            .lines()
            .filter(|l| l.contains("slipway") || l.contains("leave"))
            .collect();
        let shown = format!(
            "{}\n--- the departure's last lines (its longest silence: {}s) ---\n{}",
            crate::last_lines(&ours.join("\n"), 30),
            self.silence.as_secs(),
            crate::last_lines(departure, 15)
        );
        match self.emulator_fault() {
            Some(why) => bail!(
                "{}: {} left no {missing:?}: {why}\n{shown}",
                super::EMULATOR_FAULT,
                self.id
            ),
            None => bail!("{} left no {missing:?} on its console:\n{shown}", self.id),
        }
    }
}

/// An instance a rolling update replaced, and its replacement.
#[derive(Debug, Clone)]
pub struct Rolled {
    pub retired: Retired,
    pub new: super::Instance,
}

impl RollingUpdate {
    /// How many of `in_service` instances the next batch takes down.
    pub fn batch(&self, in_service: usize) -> usize {
        self.max_batch
            .min(in_service.saturating_sub(self.min_in_service))
    }
}

/// An SDK error with what was asked and all moto said.
fn asking<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow::anyhow!("{what}: {e:?}")
}

/// `PT30M`, `PT1H30M`, `PT45S`: the durations a template's policies use.
fn iso_duration(text: &str) -> Result<Duration> {
    let rest = text
        .strip_prefix("PT")
        .with_context(|| format!("{text:?} is not a PT… duration"))?;
    let mut secs = 0u64;
    let mut number = String::new();
    for c in rest.chars() {
        match c {
            '0'..='9' => number.push(c),
            'H' | 'M' | 'S' => {
                let n: u64 = number.parse().with_context(|| format!("{text:?}"))?;
                secs += n * match c {
                    'H' => 3600,
                    'M' => 60,
                    _ => 1,
                };
                number.clear();
            }
            _ => bail!("{text:?} is not a PT… duration"),
        }
    }
    Ok(Duration::from_secs(secs))
}

/// The request form of a launch template version's data, with `image`
/// and the instances' `tags` (key → value) replaced. The user data is left
/// out: moto cannot take it through this API (it asserts on its encoding),
/// so the harness goes on serving the instances the user data the stack
/// was created with, and [`Cluster::update_stack`] refuses a release whose
/// template changes it.
fn next_version(
    data: &ResponseLaunchTemplateData,
    image: &str,
    tags: &BTreeMap<&str, String>,
) -> RequestLaunchTemplateData {
    let profile = data.iam_instance_profile().map(|p| {
        LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
            .set_arn(p.arn().map(str::to_owned))
            .set_name(p.name().map(str::to_owned))
            .build()
    });
    let disks = data.block_device_mappings().iter().map(|m| {
        let ebs = m.ebs().map(|e| {
            LaunchTemplateEbsBlockDeviceRequest::builder()
                .set_encrypted(e.encrypted())
                .set_volume_type(e.volume_type().cloned())
                .set_volume_size(e.volume_size())
                .set_delete_on_termination(e.delete_on_termination())
                .build()
        });
        LaunchTemplateBlockDeviceMappingRequest::builder()
            .set_device_name(m.device_name().map(str::to_owned))
            .set_ebs(ebs)
            .build()
    });
    let metadata = data.metadata_options().map(|o| {
        LaunchTemplateInstanceMetadataOptionsRequest::builder()
            .set_http_endpoint(o.http_endpoint().cloned())
            .set_http_tokens(o.http_tokens().cloned())
            .set_http_put_response_hop_limit(o.http_put_response_hop_limit())
            .build()
    });
    let specs = data.tag_specifications().iter().map(|spec| {
        let instance = spec.resource_type().map(|t| t.as_str()) == Some("instance");
        let kept = spec.tags().iter().map(|t| {
            let key = t.key().unwrap_or_default();
            let value = match tags.get(key) {
                Some(v) if instance => v.clone(),
                _ => t.value().unwrap_or_default().to_owned(),
            };
            Tag::builder().key(key).value(value).build()
        });
        LaunchTemplateTagSpecificationRequest::builder()
            .set_resource_type(spec.resource_type().cloned())
            .set_tags(Some(kept.collect()))
            .build()
    });
    RequestLaunchTemplateData::builder()
        .image_id(image)
        .set_instance_type(data.instance_type().cloned())
        .set_iam_instance_profile(profile)
        .set_security_group_ids(Some(data.security_group_ids().to_vec()))
        .set_key_name(data.key_name().map(str::to_owned))
        .set_block_device_mappings(Some(disks.collect()))
        .set_metadata_options(metadata)
        .set_tag_specifications(Some(specs.collect()))
        .build()
}

impl Cluster {
    /// The template of the next release, as rendered by its publish.
    fn next_template(&self) -> Result<(String, Value)> {
        let (_, dir) = self
            .next_release
            .as_ref()
            .context("no next release was published (Options::next)")?;
        let body = std::fs::read_to_string(dir.join("template.json"))?;
        let value = serde_json::from_str(&body)?;
        Ok((body, value))
    }

    /// The stack's parameters as it has them now.
    fn parameters(&self) -> Result<BTreeMap<String, String>> {
        let cfn = aws_sdk_cloudformation::Client::new(&self.conf);
        self.rt.block_on(async {
            let d = cfn.describe_stacks().stack_name(STACK).send().await?;
            let stack = d.stacks().first().context("no stack")?;
            Ok(stack
                .parameters()
                .iter()
                .filter_map(|p| {
                    Some((
                        p.parameter_key()?.to_owned(),
                        p.parameter_value()?.to_owned(),
                    ))
                })
                .collect())
        })
    }

    /// Publishes `image` as the next release once the cluster runs (the
    /// demo's update; the test publishes its next release up front). The
    /// publisher signs with the environment's credentials, which moto does
    /// not know once IAM is enforced, so enforcement is off while it runs.
    pub fn publish_next(&mut self, image: &crate::Image) -> Result<()> {
        let version = image.manifest["version"]
            .as_str()
            .unwrap_or("next")
            .to_owned();
        let out = self.opts.dir.join(format!("release-{version}"));
        let disk = self.opts.dir.join(format!("ami-{version}.raw"));
        self.moto.relax_iam(1_000_000)?;
        let current = Some(self.release.kubernetes.as_str());
        let published = super::publish(
            &self.rt,
            &self.moto,
            image,
            &out,
            current,
            &disk,
            &mut self.disks,
        );
        let enforced = self.moto.enforce_iam();
        let next = published?;
        enforced?;
        self.next_release = Some((next, out));
        Ok(())
    }

    /// Moves the stack to the next release: the template through moto's
    /// UpdateStack (every parameter keeps its value), then what
    /// CloudFormation would do and moto does not: each launch template
    /// gets a version with the release's AMI and tags, and each group is
    /// pointed at it. No instance changes yet.
    pub fn update_stack(&mut self) -> Result<()> {
        let (body, template) = self.next_template()?;
        let (next, _) = self.next_release.clone().context("no next release")?;
        let image = next
            .amis
            .get(REGION)
            .context("the next release has no AMI here")?
            .clone();
        let release = &template["Mappings"]["Release"]["Image"];
        let tags = BTreeMap::from([
            (
                "slipway:release",
                release["Version"].as_str().unwrap_or_default().to_owned(),
            ),
            (
                "slipway:kubernetes",
                release["Kubernetes"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
        ]);
        // What CloudFormation does here, the harness does without IAM:
        // moto computes another signature than the SDK's for some of these
        // requests (UpdateStack's large body, CreateLaunchTemplateVersion's
        // data) and refuses them. Enforcement is back on at the end.
        self.moto.relax_iam(10_000)?;
        let updated = self.update_stack_unchecked(&body, &template, &image, &tags);
        let enforced = self.moto.enforce_iam();
        updated?;
        enforced
    }

    /// [`Cluster::update_stack`]'s calls.
    fn update_stack_unchecked(
        &self,
        body: &str,
        template: &Value,
        image: &str,
        tags: &BTreeMap<&str, String>,
    ) -> Result<()> {
        use aws_sdk_cloudformation::types::{Capability, Parameter};
        let parameters = self.parameters()?;
        let cfn = aws_sdk_cloudformation::Client::new(&self.conf);
        let ec2 = self.ec2();
        let asg = aws_sdk_autoscaling::Client::new(&self.conf);
        self.rt.block_on(async {
            let current = cfn
                .get_template()
                .stack_name(STACK)
                .send()
                .await
                .map_err(asking("GetTemplate"))?;
            let current: Value =
                serde_json::from_str(current.template_body().context("no template")?)?;
            for launch_template in ["MasterLaunchTemplate", "NodeLaunchTemplate"] {
                let user_data = |t: &Value| {
                    t["Resources"][launch_template]["Properties"]["LaunchTemplateData"]["UserData"]
                        .clone()
                };
                if user_data(&current) != user_data(template) {
                    bail!(
                        "the next release changes {launch_template}'s user data, which this harness cannot pass on to moto"
                    );
                }
            }
            cfn.update_stack()
                    .stack_name(STACK)
                    .template_body(body)
                    // Every parameter keeps its value. moto fails on
                    // UsePreviousValue for a parameter the stack took its
                    // default for, and on some defaults given explicitly; so
                    // those are left out (the template's default is the value).
                    .set_parameters(Some(
                        parameters
                            .iter()
                            .filter(|(k, v)| {
                                let default = &template["Parameters"][k.as_str()]["Default"];
                                default
                                    .as_str()
                                    .map_or_else(|| default.to_string(), str::to_owned)
                                    != **v
                            })
                            .map(|(k, v)| {
                                Parameter::builder()
                                    .parameter_key(k)
                                    .parameter_value(v)
                                    .build()
                            })
                            .collect(),
                    ))
                    .capabilities(Capability::CapabilityIam)
                    .send()
                    .await
                    .map_err(asking("UpdateStack"))?;
            super::settled(&cfn, "UPDATE_COMPLETE").await?;
            for (launch_template, group) in [
                ("MasterLaunchTemplate", "MasterGroup"),
                ("NodeLaunchTemplate", "NodeGroup"),
            ] {
                let id = physical_id(&cfn, launch_template).await?;
                let latest = ec2
                    .describe_launch_template_versions()
                    .launch_template_id(&id)
                    .versions("$Latest")
                    .send()
                    .await
                    .map_err(asking("DescribeLaunchTemplateVersions"))?;
                let data = latest
                    .launch_template_versions()
                    .first()
                    .and_then(|v| v.launch_template_data())
                    .with_context(|| format!("{launch_template} has no version"))?;
                let made = ec2
                    .create_launch_template_version()
                    .launch_template_id(&id)
                    .version_description(format!("release {}", tags["slipway:release"]))
                    .launch_template_data(next_version(data, image, tags))
                    .send()
                    .await
                    .map_err(asking("CreateLaunchTemplateVersion"))?;
                let version = made
                    .launch_template_version()
                    .and_then(|v| v.version_number())
                    .with_context(|| format!("{launch_template}: no version made"))?;
                let name = physical_id(&cfn, group).await?;
                asg.update_auto_scaling_group()
                    .auto_scaling_group_name(&name)
                    .launch_template(
                        aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                            .launch_template_id(&id)
                            .version(version.to_string())
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(asking("UpdateAutoScalingGroup"))?;
                say(&format!(
                    "{group} now launches {launch_template} version {version} ({image})"
                ));
            }
            anyhow::Ok(())
        })
    }

    /// A group's rolling update as the next release's template says.
    pub fn rolling_update(&self, group: &str) -> Result<RollingUpdate> {
        let (_, template) = self.next_template()?;
        let policy = &template["Resources"][group]["UpdatePolicy"]["AutoScalingRollingUpdate"];
        if policy.is_null() {
            bail!("{group} has no rolling update in the next release's template");
        }
        let parameters = self.parameters()?;
        let number = |key: &str, default: usize| -> Result<usize> {
            let v = &policy[key];
            let text = match (v, v["Ref"].as_str()) {
                (Value::Null, _) => return Ok(default),
                (_, Some(p)) => parameters
                    .get(p)
                    .with_context(|| {
                        format!("{group}.{key} names parameter {p}, which the stack lacks")
                    })?
                    .clone(),
                (Value::String(s), _) => s.clone(),
                (other, _) => other.to_string(),
            };
            text.parse()
                .with_context(|| format!("{group}.{key} is {text:?}"))
        };
        Ok(RollingUpdate {
            max_batch: number("MaxBatchSize", 1)?,
            min_in_service: number("MinInstancesInService", 0)?,
            pause: iso_duration(policy["PauseTime"].as_str().unwrap_or("PT0S"))?,
            wait_on_signals: policy["WaitOnResourceSignals"] == true,
        })
    }

    /// Takes `instances` out of service as EC2 does when a group
    /// terminates them: the power button, up to `grace` for the guest to
    /// shut down (its units leave the cluster), then terminated in the
    /// group, which launches their replacements.
    pub fn retire(
        &mut self,
        instances: &[super::Instance],
        grace: Duration,
    ) -> Result<Vec<Retired>> {
        let mut retired = Vec::new();
        for i in instances {
            let departure_from = self.vms.get(&i.id).map_or(0, |vm| vm.console().len());
            let (shutdown, silence) = match self.vms.get_mut(&i.id) {
                Some(vm) => {
                    let button = vm.uptime();
                    let took = vm.power_down(grace)?;
                    (took, vm.longest_silence_since(button))
                }
                None => (None, Duration::ZERO),
            };
            let mut console = String::new();
            if let Some(vm) = self.vms.remove(&i.id) {
                console = vm.console();
                vm.keep_log();
            }
            match shutdown {
                Some(t) => say(&format!("{} shut down in {:.1}s", i.id, t.as_secs_f64())),
                None => say(&format!(
                    "{} did not shut down within {grace:?}: killed",
                    i.id
                )),
            }
            self.terminate(&i.id)?;
            retired.push(Retired {
                id: i.id.clone(),
                shutdown,
                console,
                departure_from,
                silence,
            });
        }
        Ok(retired)
    }

    /// Rolls `group` (its members of `role`) onto the next release as the
    /// template's rolling update says, a batch at a time: each batch is
    /// retired, `between` runs for each retired instance (while its disks
    /// are closed), the replacements boot with `dropins` and each must
    /// signal within `PauseTime`. Fails if the policy leaves no room to
    /// start, a replacement is not from the next release's AMI, or the group
    /// ever holds more instances than it did.
    pub fn roll(
        &mut self,
        group: &str,
        role: Role,
        grace: Duration,
        dropins: &[(&str, &str)],
        between: &mut dyn FnMut(&mut Cluster, &Retired) -> Result<()>,
    ) -> Result<Vec<Rolled>> {
        let policy = self.rolling_update(group)?;
        let image = self
            .next_release
            .as_ref()
            .and_then(|(r, _)| r.amis.get(REGION))
            .context("no next release")?
            .clone();
        let members = |c: &Cluster| -> Result<Vec<super::Instance>> {
            Ok(c.instances()?
                .into_iter()
                .filter(|i| i.role == role)
                .collect())
        };
        let capacity = members(self)?.len();
        let mut known: Vec<String> = self.instances()?.into_iter().map(|i| i.id).collect();
        let mut rolled = Vec::new();
        loop {
            let now = members(self)?;
            let old: Vec<super::Instance> =
                now.iter().filter(|i| i.image != image).cloned().collect();
            if old.is_empty() {
                return Ok(rolled);
            }
            let batch = policy.batch(now.len());
            if batch == 0 {
                bail!(
                    "{group}'s rolling update keeps {} of {} in service: it cannot start",
                    policy.min_in_service,
                    now.len()
                );
            }
            let started = Instant::now();
            let retired = self.retire(&old[..batch.min(old.len())], grace)?;
            let held = |c: &Cluster, when: &str| -> Result<()> {
                let n = members(c)?.len();
                if n > capacity {
                    bail!("{group} holds {n} instances {when}, more than its {capacity}");
                }
                Ok(())
            };
            held(self, "after its batch was terminated")?;
            let mut new = Vec::new();
            for r in &retired {
                between(self, r)?;
                known.push(r.id.clone());
            }
            for _ in &retired {
                let i = self.replacement(role, &known, Duration::from_secs(120))?;
                if i.image != image {
                    bail!(
                        "{group} launched {} from {}, not the next release's {image}",
                        i.id,
                        i.image
                    );
                }
                known.push(i.id.clone());
                self.launch_with(&i, dropins)?;
                new.push(i);
            }
            held(self, "once the batch's replacements launched")?;
            if policy.wait_on_signals {
                for i in &new {
                    self.signalled(&i.id, role, policy.pause)?;
                }
            }
            self.timing(
                &format!(
                    "update: {group} replaced {} (retired, launched, signalled)",
                    new.len()
                ),
                started.elapsed(),
            );
            rolled.extend(
                retired
                    .into_iter()
                    .zip(new)
                    .map(|(retired, new)| Rolled { retired, new }),
            );
        }
    }

    /// Waits up to `pause` for `instance`'s SUCCESS signal to reach the
    /// local AWS (read from the calls the members made through the fault
    /// proxy, since moto keeps no record); a FAILURE signal ends the wait.
    pub fn signalled(&self, instance: &str, role: Role, pause: Duration) -> Result<Duration> {
        let group = match role {
            Role::Master => "MasterGroup",
            Role::Node => "NodeGroup",
        };
        let started = Instant::now();
        loop {
            for seen in self.faults.requests() {
                let about = |k: &str| seen.params.get(k).map(String::as_str);
                if seen.action != "SignalResource"
                    || seen.fault.is_some()
                    || about("UniqueId") != Some(instance)
                {
                    continue;
                }
                if about("LogicalResourceId") != Some(group) {
                    bail!(
                        "{instance} signalled {:?}, not {group}",
                        about("LogicalResourceId")
                    );
                }
                match about("Status") {
                    Some("SUCCESS") => return Ok(started.elapsed()),
                    other => bail!("{instance} signalled {other:?} to {group}"),
                }
            }
            self.guests_alive(&format!("waiting for {instance}'s signal"))?;
            if started.elapsed() > pause {
                let tail = self.vms.get(instance).map(|vm| vm.tail(60));
                bail!(
                    "no signal from {instance} within the group's PauseTime ({pause:?})\n{}",
                    tail.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retired(before: &str, departure: &str) -> Retired {
        Retired {
            id: "i-1".into(),
            shutdown: Some(Duration::from_secs(27)),
            console: format!("{before}{departure}"),
            departure_from: before.len(),
            silence: Duration::from_secs(40),
        }
    }

    #[test]
    fn a_departure_is_judged_by_what_it_printed_after_the_power_button() {
        let boot = "[ 1.0] slipway-init[9]: cordoned node/i-1 (an earlier boot's)\n";
        let clean = "[ 90.0] slipway-init[77]: cordoned node/i-1\n\
                     [ 91.0] slipway-init[77]: evicted default/steady-x\n";
        let markers = ["cordoned node/i-1", "evicted default/steady-"];
        assert!(retired(boot, clean).left_cleanly(&markers).is_ok());

        // What the boot printed does not count.
        let silent = retired(boot, "[ 90.0] reboot: Power down\n");
        let e = silent.left_cleanly(&markers).unwrap_err().to_string();
        assert!(e.contains("evicted default/steady-"), "{e}");
        assert!(!e.contains(crate::cluster::EMULATOR_FAULT), "{e}");
        assert_eq!(silent.kernel_fault(), None);

        // A kernel that died on the way out is the emulator's fault.
        let died = retired(
            boot,
            "[ 90.0] slipway-init[77]: leaving\n[ 91.0] Oops: int3: 0000 [#1] PREEMPT SMP\n",
        );
        let e = died.left_cleanly(&markers).unwrap_err().to_string();
        assert!(e.starts_with(crate::cluster::EMULATOR_FAULT), "{e}");
        assert!(e.contains("slipway-init[77]: leaving"), "{e}");
        assert!(died.kernel_fault().unwrap().contains("Oops: int3"));

        // A guest that froze on the way out (a live one prints at least
        // every minute or so) is the emulator's fault too, killed or not.
        let mut froze = retired(boot, "[ 90.0] slipway-init[77]: slipway-init starting\n");
        froze.silence = crate::cluster::GUEST_SILENCE + Duration::from_secs(1);
        let e = froze.left_cleanly(&markers).unwrap_err().to_string();
        assert!(e.starts_with(crate::cluster::EMULATOR_FAULT), "{e}");
        assert!(e.contains("printed nothing for 481s"), "{e}");
        froze.shutdown = None;
        let e = froze.shut_down(Duration::from_secs(540)).unwrap_err();
        assert!(e.to_string().starts_with(crate::cluster::EMULATOR_FAULT));
        let mut killed = retired(boot, clean);
        killed.shutdown = None;
        let e = killed.shut_down(Duration::from_secs(540)).unwrap_err();
        assert!(
            !e.to_string().contains(crate::cluster::EMULATOR_FAULT),
            "{e}"
        );
        assert!(retired(boot, clean)
            .shut_down(Duration::from_secs(540))
            .is_ok());

        // A cut inside a character (one read half-way through writing it).
        let mut cut = retired("boot ●", "[ 90.0] reboot: Power down\n");
        cut.departure_from -= 1;
        assert!(cut.departure().starts_with('●'), "{}", cut.departure());
    }

    #[test]
    fn pause_times_and_batches_read_as_the_group_would() {
        assert_eq!(iso_duration("PT30M").unwrap(), Duration::from_secs(1800));
        assert_eq!(iso_duration("PT1H5M7S").unwrap(), Duration::from_secs(3907));
        assert!(iso_duration("30M").is_err());
        assert!(iso_duration("PT3D").is_err());
        let policy = RollingUpdate {
            max_batch: 2,
            min_in_service: 1,
            pause: Duration::ZERO,
            wait_on_signals: true,
        };
        assert_eq!(policy.batch(4), 2);
        assert_eq!(policy.batch(2), 1);
        assert_eq!(policy.batch(1), 0);
    }
}
