//! The stack config: what the CloudFormation stack tells an instance about
//! its cluster, as TOML in the launch template's user data (or a file).
//! Parsing is strict and total: unknown keys, missing keys, wrong types,
//! bad CIDRs or IDs and non-UTF-8 input are errors that name the problem,
//! never panics.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// User data is at most 16 KiB on EC2; anything much larger is not ours.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("stack config is {0} bytes; the limit is {MAX_CONFIG_BYTES}")]
    TooLarge(usize),
    #[error("stack config is empty")]
    Empty,
    #[error("stack config is not UTF-8 text (invalid byte at offset {0})")]
    NotText(usize),
    #[error("stack config: {0}")]
    Syntax(String),
    #[error("stack config: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("stack config: `{key}` is required for a {role}")]
    Missing { key: &'static str, role: Role },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Master,
    Node,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Node => "node",
        })
    }
}

/// An IPv4 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// The `n`th address of the network (`n` = 1 is the first host).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is longer than 32"));
        }
        let cidr = Cidr { addr, prefix };
        if u32::from(addr) & cidr.mask() != u32::from(addr) {
            return Err(format!("{s} has host bits set"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The raw shape of the TOML, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    role: Role,
    cluster_name: String,
    secrets_bucket: String,
    api_name: String,
    pod_cidr: String,
    service_cidr: String,
    master_eip_allocation: Option<String>,
    master_dns_zone: Option<String>,
    master_addresses: Option<BTreeMap<String, String>>,
    master_restore: Option<bool>,
    master_renew_before_days: Option<u32>,
    master_token_hours: Option<u32>,
    master_backup_minutes: Option<u32>,
    master_backups_kept: Option<u32>,
    master_backup_days: Option<u32>,
    master_restore_from: Option<RestoreFrom>,
    region: Option<String>,
    aws_endpoint: Option<String>,
    signal_stack: Option<String>,
    signal_resource: Option<String>,
}

/// Master-only settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterConfig {
    pub eip_allocation: String,
    /// The Route 53 private hosted zone holding `api_name`'s record.
    pub dns_zone: String,
    /// The address reserved for the master in each zone its group spans:
    /// a master takes its own zone's and points `api_name` at it.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// This boot may start a fresh etcd on a blank volume although the
    /// cluster's PKI exists (a deliberate restore); off by default.
    pub restore: bool,
    /// Leaf certificates ending within this many days are renewed.
    pub renew_before_days: u32,
    /// How long each bootstrap token lasts.
    pub token_hours: u32,
    /// etcd snapshots taken into the secrets bucket, and how many kept.
    pub backups: Backups,
    /// Which kind of backup a master restores from when its zone has no
    /// data volume and both kinds exist.
    pub restore_from: RestoreFrom,
}

/// Which backup a restore prefers: the newest of either kind, or one kind
/// (the other is used only when the preferred kind has none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreFrom {
    /// Whichever was taken last: an EBS snapshot of the data volume, or an
    /// etcd backup in the secrets bucket.
    #[default]
    Newest,
    /// An EBS snapshot: the whole volume as it was, no etcd restore step.
    VolumeSnapshot,
    /// An etcd backup: a consistent snapshot, usually the more recent.
    EtcdBackup,
}

/// When the master snapshots etcd into the secrets bucket and which
/// snapshots it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backups {
    /// Minutes between snapshots; 0 takes none on schedule.
    pub every_minutes: u32,
    /// The newest this many are kept.
    pub keep_last: u32,
    /// And the newest of each UTC day for this many days.
    pub daily_days: u32,
}

impl Default for Backups {
    fn default() -> Self {
        Self {
            every_minutes: 15,
            keep_last: 8,
            daily_days: 7,
        }
    }
}

impl Backups {
    fn from_raw(
        every: Option<u32>,
        kept: Option<u32>,
        days: Option<u32>,
    ) -> Result<Self, ConfigError> {
        let d = Self::default();
        let backups = Self {
            every_minutes: every.unwrap_or(d.every_minutes),
            keep_last: kept.unwrap_or(d.keep_last),
            daily_days: days.unwrap_or(d.daily_days),
        };
        if backups.every_minutes > 24 * 60 {
            return Err(invalid(
                "master_backup_minutes",
                format!(
                    "{} must be at most 1440 (a day); 0 takes none on schedule",
                    backups.every_minutes
                ),
            ));
        }
        if !(1..=1000).contains(&backups.keep_last) {
            return Err(invalid(
                "master_backups_kept",
                format!("{} must be between 1 and 1000", backups.keep_last),
            ));
        }
        if backups.daily_days > 366 {
            return Err(invalid(
                "master_backup_days",
                format!("{} must be at most 366", backups.daily_days),
            ));
        }
        Ok(backups)
    }
}

/// The renewal window when the config names none (kubeadm's leaves last a
/// year; a quarter of it leaves room for a master that is down a while).
pub const RENEW_BEFORE_DAYS: u32 = 90;

/// How long a bootstrap token lasts when the config names no lifetime
/// (kubeadm's default too).
pub const TOKEN_HOURS: u32 = 24;

/// Where to send CloudFormation's SignalResource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub stack: String,
    pub resource: String,
}

/// What a member is: a master, with the settings only a master has, or a
/// node, which has none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Master(MasterConfig),
    Node,
}

impl Member {
    pub fn role(&self) -> Role {
        match self {
            Member::Master(_) => Role::Master,
            Member::Node => Role::Node,
        }
    }
}

/// A validated stack config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackConfig {
    pub member: Member,
    pub cluster_name: String,
    pub secrets_bucket: String,
    /// The API server's name inside the VPC, which every kubelet and
    /// kube-proxy dials: a record in a private hosted zone that each master
    /// points at its own zone's reserved address.
    pub api_name: String,
    pub pod_cidr: Cidr,
    pub service_cidr: Cidr,
    pub region: Option<String>,
    pub signal: Option<Signal>,
}

/// A token must outlast the hourly renewal's half-life check by hours, and
/// a leaked one should not stay good for long: two hours to one week.
fn token_hours(hours: Option<u32>) -> Result<u32, ConfigError> {
    let hours = hours.unwrap_or(TOKEN_HOURS);
    if !(2..=168).contains(&hours) {
        return Err(invalid(
            "master_token_hours",
            format!("{hours} must be between 2 and 168"),
        ));
    }
    Ok(hours)
}

fn renew_before_days(days: Option<u32>) -> Result<u32, ConfigError> {
    let days = days.unwrap_or(RENEW_BEFORE_DAYS);
    let most = u32::try_from(crate::pki::LEAF_DAYS - 30).unwrap_or(u32::MAX);
    if !(1..=most).contains(&days) {
        return Err(invalid(
            "master_renew_before_days",
            format!(
                "{days} must be between 1 and {most} (leaf certificates last {} days)",
                crate::pki::LEAF_DAYS
            ),
        ));
    }
    Ok(days)
}

fn check_id(key: &'static str, value: &str, prefix: &str) -> Result<(), ConfigError> {
    let rest = value.strip_prefix(prefix).unwrap_or("");
    let ok = (8..=17).contains(&rest.len())
        && rest
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{value:?} is not an ID of the form {prefix}<8-17 lowercase hex digits>"),
        ))
    }
}

fn check_dns_label(key: &'static str, value: &str, max: usize) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("{value:?} must be 1-{max} lowercase letters, digits or '-', not starting or ending with '-'")))
    }
}

fn check_bucket(value: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric()
        && !value.contains("..")
        && value.parse::<Ipv4Addr>().is_err();
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "secrets_bucket",
            format!("{value:?} is not a valid S3 bucket name"),
        ))
    }
}

/// A DNS name of lowercase labels, as Route 53 stores it (no trailing dot).
fn check_dns_name(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if value.len() <= 253 && value.split('.').count() >= 2 && value.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{value:?} is not a DNS name of two or more lowercase labels"),
        ))
    }
}

/// A Route 53 hosted zone ID (upper-case letters and digits, as in
/// `Z0123456789ABC`, without the `/hostedzone/` prefix).
fn check_zone_id(value: &str) -> Result<(), ConfigError> {
    let ok = (1..=32).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "master_dns_zone",
            format!("{value:?} is not a Route 53 hosted zone ID (upper-case letters and digits)"),
        ))
    }
}

/// The master's reserved address per zone: valid, distinct, and outside
/// the pod and service networks.
fn master_addresses(
    raw: BTreeMap<String, String>,
    networks: &[Cidr],
) -> Result<BTreeMap<String, Ipv4Addr>, ConfigError> {
    let key = "master_addresses";
    if raw.is_empty() {
        return Err(invalid(
            key,
            "names no zone; the master needs an address in each zone it may run in",
        ));
    }
    let mut out = BTreeMap::new();
    for (zone, text) in raw {
        let ip: Ipv4Addr = text
            .parse()
            .map_err(|_| invalid(key, format!("{zone}: {text:?} is not an IPv4 address")))?;
        if networks.iter().any(|n| n.contains(ip)) {
            return Err(invalid(
                key,
                format!("{zone}: {ip} lies inside the pod or service network"),
            ));
        }
        if let Some((other, _)) = out.iter().find(|(_, a)| **a == ip) {
            return Err(invalid(key, format!("{zone} and {other} share {ip}")));
        }
        out.insert(zone, ip);
    }
    Ok(out)
}

/// A TOML error as one line: where, the offending line, and what is wrong.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_owned();
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let line: String = line.chars().take(80).collect();
    format!("line {line_no} (`{line}`): {}", e.message())
}

impl StackConfig {
    /// Parses and validates raw user data.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::NotText(e.valid_up_to()))?;
        if text.trim().is_empty() {
            return Err(ConfigError::Empty);
        }
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Syntax(describe(text, &e)))?;
        Self::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Self, ConfigError> {
        check_dns_label("cluster_name", &raw.cluster_name, 40)?;
        check_bucket(&raw.secrets_bucket)?;
        check_dns_name("api_name", &raw.api_name)?;
        let pod_cidr: Cidr = raw.pod_cidr.parse().map_err(|e| invalid("pod_cidr", e))?;
        let service_cidr: Cidr = raw
            .service_cidr
            .parse()
            .map_err(|e| invalid("service_cidr", e))?;
        if pod_cidr.prefix > 24 {
            return Err(invalid(
                "pod_cidr",
                format!("/{} leaves no room for a /24 per node", pod_cidr.prefix),
            ));
        }
        if service_cidr.prefix > 28 || service_cidr.prefix < 12 {
            return Err(invalid(
                "service_cidr",
                format!("/{} must be between /12 and /28", service_cidr.prefix),
            ));
        }
        if pod_cidr.overlaps(&service_cidr) {
            return Err(invalid(
                "service_cidr",
                format!("{service_cidr} overlaps pod_cidr {pod_cidr}"),
            ));
        }
        let member = match raw.role {
            Role::Master => {
                let eip = raw.master_eip_allocation.ok_or(ConfigError::Missing {
                    key: "master_eip_allocation",
                    role: Role::Master,
                })?;
                check_id("master_eip_allocation", &eip, "eipalloc-")?;
                let dns_zone = raw.master_dns_zone.ok_or(ConfigError::Missing {
                    key: "master_dns_zone",
                    role: Role::Master,
                })?;
                check_zone_id(&dns_zone)?;
                let addresses = master_addresses(
                    raw.master_addresses.ok_or(ConfigError::Missing {
                        key: "master_addresses",
                        role: Role::Master,
                    })?,
                    &[pod_cidr, service_cidr],
                )?;
                Member::Master(MasterConfig {
                    eip_allocation: eip,
                    dns_zone,
                    addresses,
                    restore: raw.master_restore.unwrap_or(false),
                    renew_before_days: renew_before_days(raw.master_renew_before_days)?,
                    token_hours: token_hours(raw.master_token_hours)?,
                    backups: Backups::from_raw(
                        raw.master_backup_minutes,
                        raw.master_backups_kept,
                        raw.master_backup_days,
                    )?,
                    restore_from: raw.master_restore_from.unwrap_or_default(),
                })
            }
            Role::Node => {
                if raw.master_eip_allocation.is_some()
                    || raw.master_dns_zone.is_some()
                    || raw.master_addresses.is_some()
                    || raw.master_restore.is_some()
                    || raw.master_renew_before_days.is_some()
                    || raw.master_token_hours.is_some()
                    || raw.master_backup_minutes.is_some()
                    || raw.master_backups_kept.is_some()
                    || raw.master_backup_days.is_some()
                    || raw.master_restore_from.is_some()
                {
                    return Err(invalid(
                        "master_eip_allocation",
                        "is only for a master; a node must not name the master's address or settings",
                    ));
                }
                Member::Node
            }
        };
        if let Some(region) = &raw.region {
            let ok = region.split('-').count() >= 3
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(invalid(
                    "region",
                    format!("{region:?} is not an AWS region name"),
                ));
            }
        }
        // Whoever writes the user data must not be able to send the
        // instance's credentials and secrets to an endpoint of their own.
        if raw.aws_endpoint.is_some() {
            return Err(invalid(
                "aws_endpoint",
                "the AWS endpoint is never taken from the stack config; a test \
                 passes --aws-endpoint (or SLIPWAY_AWS_ENDPOINT) instead"
                    .to_owned(),
            ));
        }
        let signal = match (raw.signal_stack, raw.signal_resource) {
            (Some(stack), Some(resource)) => {
                if stack.is_empty() || resource.is_empty() {
                    return Err(invalid(
                        "signal_stack",
                        "and signal_resource must not be empty",
                    ));
                }
                Some(Signal { stack, resource })
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("signal_resource", "is required with signal_stack"))
            }
            (None, Some(_)) => {
                return Err(invalid("signal_stack", "is required with signal_resource"))
            }
        };
        Ok(Self {
            member,
            cluster_name: raw.cluster_name,
            secrets_bucket: raw.secrets_bucket,
            api_name: raw.api_name,
            pod_cidr,
            service_cidr,
            region: raw.region,
            signal,
        })
    }

    pub fn role(&self) -> Role {
        self.member.role()
    }

    /// Every address the stack reserves for a master, one per zone (none
    /// in a node's config).
    pub fn master_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let addresses = match &self.member {
            Member::Master(m) => Some(m.addresses.values().copied()),
            Member::Node => None,
        };
        addresses.into_iter().flatten()
    }

    /// The first service IP: the `kubernetes` Service's ClusterIP.
    pub fn api_service_ip(&self) -> Ipv4Addr {
        self.service_cidr.nth(1).unwrap_or(self.service_cidr.addr)
    }

    /// The cluster DNS Service's ClusterIP (the tenth service address).
    pub fn dns_service_ip(&self) -> Ipv4Addr {
        self.service_cidr.nth(10).unwrap_or(self.service_cidr.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(c: &StackConfig) -> &MasterConfig {
        match &c.member {
            Member::Master(m) => m,
            Member::Node => panic!("a node's config"),
        }
    }

    pub const MASTER: &str = r#"
role = "master"
cluster_name = "demo"
secrets_bucket = "demo-secrets-0123"
api_name = "api.demo.slipway.internal"
pod_cidr = "10.244.0.0/16"
service_cidr = "10.96.0.0/12"
master_eip_allocation = "eipalloc-0123456789abcdef0"
master_dns_zone = "Z0123456789ABCDEFGHIJ"
master_addresses = { "us-east-1a" = "10.0.1.10", "us-east-1b" = "10.0.2.10" }
"#;

    fn node() -> String {
        MASTER
            .replace("role = \"master\"", "role = \"node\"")
            .lines()
            .filter(|l| !l.starts_with("master_"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_restore_source_defaults_to_the_newest_and_takes_either_kind() {
        let from = |extra: &str| {
            let text = MASTER.replace("role = \"master\"", &format!("role = \"master\"\n{extra}"));
            master(&StackConfig::parse(text.as_bytes()).unwrap()).restore_from
        };
        assert_eq!(from(""), RestoreFrom::Newest);
        assert_eq!(
            from("master_restore_from = \"volume-snapshot\""),
            RestoreFrom::VolumeSnapshot
        );
        assert_eq!(
            from("master_restore_from = \"etcd-backup\""),
            RestoreFrom::EtcdBackup
        );
    }

    #[test]
    fn a_master_config_parses() {
        let c = StackConfig::parse(MASTER.as_bytes()).unwrap();
        assert_eq!(c.role(), Role::Master);
        assert_eq!(master(&c).eip_allocation, "eipalloc-0123456789abcdef0");
        assert_eq!(c.api_service_ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(c.dns_service_ip(), Ipv4Addr::new(10, 96, 0, 10));
        assert!(!master(&c).restore);
        assert_eq!(c.api_name, "api.demo.slipway.internal");
        let m = master(&c);
        assert_eq!(m.dns_zone, "Z0123456789ABCDEFGHIJ");
        assert_eq!(
            m.addresses.get("us-east-1b"),
            Some(&Ipv4Addr::new(10, 0, 2, 10))
        );
        let restore = format!("{MASTER}master_restore = true\n");
        let c = StackConfig::parse(restore.as_bytes()).unwrap();
        assert!(master(&c).restore);
        let window = format!("{MASTER}master_renew_before_days = 120\n");
        let c = StackConfig::parse(window.as_bytes()).unwrap();
        assert_eq!(master(&c).renew_before_days, 120);
        let c = StackConfig::parse(MASTER.as_bytes()).unwrap();
        assert_eq!(master(&c).token_hours, 24);
        let hours = format!("{MASTER}master_token_hours = 6\n");
        let c = StackConfig::parse(hours.as_bytes()).unwrap();
        assert_eq!(master(&c).token_hours, 6);
        let c = StackConfig::parse(MASTER.as_bytes()).unwrap();
        assert_eq!(master(&c).backups, Backups::default());
        let backups = format!(
            "{MASTER}master_backup_minutes = 0\nmaster_backups_kept = 3\nmaster_backup_days = 30\n"
        );
        let c = StackConfig::parse(backups.as_bytes()).unwrap();
        assert_eq!(
            master(&c).backups,
            Backups {
                every_minutes: 0,
                keep_last: 3,
                daily_days: 30
            }
        );
    }

    #[test]
    fn a_node_config_parses() {
        let c = StackConfig::parse(node().as_bytes()).unwrap();
        assert_eq!(c.role(), Role::Node);
        assert_eq!(c.member, Member::Node);
    }

    /// Each malformed config, and a word its error must contain.
    fn malformed() -> Vec<(Vec<u8>, &'static str)> {
        let m = |from: &str, to: &str| MASTER.replace(from, to).into_bytes();
        let drop = |key: &str| {
            MASTER
                .lines()
                .filter(|l| !l.starts_with(key))
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        };
        let mut huge = MASTER.as_bytes().to_vec();
        huge.extend(std::iter::repeat_n(b'#', MAX_CONFIG_BYTES));
        vec![
            (Vec::new(), "empty"),
            (b"   \n\n".to_vec(), "empty"),
            (vec![0xff, 0xfe, 0x00, 0x81, 0x92], "UTF-8"),
            (b"\x00\x01\x02garbage\x7f".to_vec(), "stack config"),
            (huge, "limit"),
            (b"role = ".to_vec(), "stack config"),
            (drop("role"), "role"),
            (drop("cluster_name"), "cluster_name"),
            (drop("secrets_bucket"), "secrets_bucket"),
            (drop("api_name"), "api_name"),
            (drop("master_eip_allocation"), "master_eip_allocation"),
            (drop("master_dns_zone"), "master_dns_zone"),
            (drop("master_addresses"), "master_addresses"),
            (m("api.demo.slipway.internal", "API.demo"), "api_name"),
            (m("api.demo.slipway.internal", "localhost"), "api_name"),
            (m("Z0123456789ABCDEFGHIJ", "zone-1"), "master_dns_zone"),
            (m("\"10.0.2.10\"", "\"10.0.1.10\""), "share 10.0.1.10"),
            (
                m(
                    r#"{ "us-east-1a" = "10.0.1.10", "us-east-1b" = "10.0.2.10" }"#,
                    "{}",
                ),
                "names no zone",
            ),
            (m("role = \"master\"", "role = \"worker\""), "worker"),
            (m("role = \"master\"", "role = 7"), "role"),
            (
                m("cluster_name = \"demo\"", "cluster_name = \"Demo_Cluster\""),
                "cluster_name",
            ),
            (
                m("cluster_name = \"demo\"", "cluster_name = 42"),
                "cluster_name",
            ),
            (m("demo-secrets-0123", "Demo..Secrets"), "secrets_bucket"),
            (m("10.0.1.10", "10.0.1.300"), "us-east-1a"),
            (m("10.244.0.0/16", "10.244.0.0"), "pod_cidr"),
            (m("10.244.0.0/16", "10.244.0.0/33"), "pod_cidr"),
            (m("10.244.0.0/16", "10.244.1.0/16"), "host bits"),
            (m("10.244.0.0/16", "10.96.0.0/16"), "overlaps"),
            (m("10.96.0.0/12", "10.96.0.0/30"), "service_cidr"),
            (
                m("10.0.1.10", "10.96.0.5"),
                "inside the pod or service network",
            ),
            (
                m("eipalloc-0123456789abcdef0", "eip-123"),
                "master_eip_allocation",
            ),
            // The volume is found by its tag; the user data names none.
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_volume = \"vol-0123456789abcdef0\"",
                ),
                "master_volume",
            ),
            (
                m("role = \"master\"", "role = \"master\"\nextra = true"),
                "extra",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_renew_before_days = 0",
                ),
                "master_renew_before_days",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_token_hours = 1",
                ),
                "between 2 and 168",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_backups_kept = 0",
                ),
                "master_backups_kept",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_backup_minutes = 2000",
                ),
                "at most 1440",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_renew_before_days = 400",
                ),
                "between 1 and 335",
            ),
            (
                m("role = \"master\"", "role = \"master\"\nregion = \"mars\""),
                "region",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\naws_endpoint = \"http://attacker.example\"",
                ),
                "aws_endpoint",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nsignal_stack = \"s\"",
                ),
                "signal_resource",
            ),
            (
                node()
                    .replace(
                        "role = \"node\"",
                        "role = \"node\"\nmaster_eip_allocation = \"eipalloc-0123456789abcdef0\"",
                    )
                    .into_bytes(),
                "only for a master",
            ),
            (
                node()
                    .replace("role = \"node\"", "role = \"node\"\nmaster_restore = true")
                    .into_bytes(),
                "only for a master",
            ),
            (
                m("role = \"master\"", "role = \"master\"\nmaster_restore = 1"),
                "master_restore",
            ),
            (
                m(
                    "role = \"master\"",
                    "role = \"master\"\nmaster_restore_from = \"latest\"",
                ),
                "master_restore_from",
            ),
            (
                node()
                    .replace(
                        "role = \"node\"",
                        "role = \"node\"\nmaster_restore_from = \"newest\"",
                    )
                    .into_bytes(),
                "only for a master",
            ),
        ]
    }

    #[test]
    fn malformed_configs_give_clear_errors() {
        let cases = malformed();
        assert!(cases.len() >= 20);
        for (input, word) in cases {
            let err = StackConfig::parse(&input)
                .expect_err(&String::from_utf8_lossy(&input[..input.len().min(200)]));
            let msg = err.to_string();
            assert!(msg.contains(word), "error {msg:?} should mention {word:?}");
        }
    }

    #[test]
    fn cidr_arithmetic() {
        let c: Cidr = "10.96.0.0/12".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(10, 111, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 112, 0, 0)));
        assert_eq!(c.nth(10), Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix, 0);
    }

    proptest::proptest! {
        #[test]
        fn the_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = StackConfig::parse(&bytes);
        }

        #[test]
        fn mutated_valid_configs_never_panic(pos in 0usize..400, byte in proptest::num::u8::ANY) {
            let mut input = MASTER.as_bytes().to_vec();
            let at = pos % input.len();
            input[at] = byte;
            let _ = StackConfig::parse(&input);
        }
    }
}
