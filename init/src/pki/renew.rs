//! Renewal: every leaf certificate inside the renewal window (or missing a
//! SAN the identity now asks for) is issued again by the same CA, with the
//! same subject, key and usages, a new serial and a full new lifetime. The
//! CAs and the service-account key never change here; a CA near its end is
//! reported, and replacing it stays a person's decision.
//!
//! Keeping each leaf's key means a component that reads the new
//! certificate before its peers do still trusts and is trusted by all of
//! them: during a renewal, old and new certificates are equally valid.

use super::{
    b64, b64_decode, gen_err, wanted_sans, Bundle, Identity, PkiError, Validity, CAS, KUBECONFIGS,
    LEAVES,
};
use rcgen::{CertificateParams, KeyPair, SanType};
use time::{Duration, OffsetDateTime};

/// How long before its end a CA is reported as expiring.
pub const CA_WARNING: Duration = Duration::days(365);

/// One certificate of the bundle, as its status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The file holding it (a kubeconfig for an embedded client certificate).
    pub file: String,
    pub subject: String,
    /// Hex, as `openssl x509 -serial` prints it (lower case, colon-free).
    pub serial: String,
    pub not_after: OffsetDateTime,
    pub ca: bool,
}

/// Why a leaf is renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// It ends inside the renewal window.
    Expires(OffsetDateTime),
    /// The identity asks for names it lacks.
    MissingNames(Vec<String>),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Expires(at) => write!(f, "expires {}", day(*at)),
            Why::MissingNames(names) => write!(f, "lacks {}", names.join(", ")),
        }
    }
}

/// A leaf due for renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub file: String,
    pub why: Why,
}

/// A renewed bundle and what was renewed in it.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub bundle: Bundle,
    pub renewed: Vec<Due>,
}

/// `2027-03-01` for a time.
pub fn day(t: OffsetDateTime) -> String {
    let d = t.date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// The RFC 3339 form of a time, to the second, in UTC.
pub fn timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        day(t),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A leaf the bundle renews: where its certificate and key are, the CA
/// that issues it, and the names it must carry.
struct Leaf {
    file: String,
    issuer: &'static str,
    cert: String,
    key: String,
    wanted: Vec<SanType>,
}

fn unreadable(file: &str, message: impl std::fmt::Display) -> PkiError {
    PkiError::Unreadable {
        file: file.to_owned(),
        message: message.to_string(),
    }
}

/// The value of `field:` in a kubeconfig we wrote (one per file).
fn kubeconfig_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(": "))
}

/// The API server and bearer token of a kubeconfig we wrote with a token
/// (a node's bootstrap kubeconfig).
pub fn kubeconfig_token(file: &str, text: &str) -> Result<(String, String), PkiError> {
    let field = |name: &str| {
        kubeconfig_field(text, name)
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| unreadable(file, format!("no {name}")))
    };
    Ok((field("server")?, field("token")?))
}

/// The client certificate and key a kubeconfig embeds, as PEM.
pub fn kubeconfig_credentials(file: &str, text: &str) -> Result<(String, String), PkiError> {
    let decode = |field: &str| {
        kubeconfig_field(text, field)
            .and_then(b64_decode)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| unreadable(file, format!("no {field}")))
    };
    Ok((
        decode("client-certificate-data")?,
        decode("client-key-data")?,
    ))
}

/// What a PEM certificate says of itself; `file` names it in errors.
pub fn certificate(file: &str, pem: &str) -> Result<Certificate, PkiError> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| unreadable(file, e))?;
    let cert = pem.parse_x509().map_err(|e| unreadable(file, e))?;
    Ok(Certificate {
        file: file.to_owned(),
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_after: cert.validity().not_after.to_datetime(),
        ca: cert.is_ca(),
    })
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::DnsName(name) => name.as_str().to_owned(),
        SanType::IpAddress(ip) => ip.to_string(),
        other => format!("{other:?}"),
    }
}

impl Bundle {
    /// The leaves renewal looks after, with what they must name for `id`.
    fn leaves(&self, id: &Identity) -> Result<Vec<Leaf>, PkiError> {
        let mut leaves = Vec::new();
        for spec in LEAVES {
            leaves.push(Leaf {
                file: format!("{}.crt", spec.stem),
                issuer: spec.issuer,
                cert: self.get(&format!("{}.crt", spec.stem))?.to_owned(),
                key: self.get(&format!("{}.key", spec.stem))?.to_owned(),
                wanted: wanted_sans(spec.stem, id)?,
            });
        }
        for &(file, ..) in KUBECONFIGS {
            let (cert, key) = kubeconfig_credentials(file, self.get(file)?)?;
            leaves.push(Leaf {
                file: file.to_owned(),
                issuer: "ca",
                cert,
                key,
                wanted: Vec::new(),
            });
        }
        Ok(leaves)
    }

    /// Every certificate of the bundle: the CAs, then the leaves.
    pub fn certificates(&self) -> Result<Vec<Certificate>, PkiError> {
        let mut all = Vec::new();
        for stem in CAS {
            let file = format!("{stem}.crt");
            all.push(certificate(&file, self.get(&file)?)?);
        }
        for spec in LEAVES {
            let file = format!("{}.crt", spec.stem);
            all.push(certificate(&file, self.get(&file)?)?);
        }
        for &(file, ..) in KUBECONFIGS {
            let (cert, _) = kubeconfig_credentials(file, self.get(file)?)?;
            all.push(certificate(file, &cert)?);
        }
        Ok(all)
    }

    /// The leaves due at `now`: ending within `window`, or lacking a name
    /// `id` asks for.
    pub fn due(
        &self,
        id: &Identity,
        now: OffsetDateTime,
        window: Duration,
    ) -> Result<Vec<Due>, PkiError> {
        let mut due = Vec::new();
        for leaf in self.leaves(id)? {
            if let Some(why) = why_due(&leaf, now, window)? {
                due.push(Due {
                    file: leaf.file,
                    why,
                });
            }
        }
        Ok(due)
    }

    /// The bundle with every due leaf issued again (see the module's
    /// comment), or `None` when nothing is due.
    pub fn renew(
        &self,
        id: &Identity,
        validity: &Validity,
        window: Duration,
    ) -> Result<Option<Renewal>, PkiError> {
        let mut bundle = self.clone();
        let mut renewed = Vec::new();
        for leaf in self.leaves(id)? {
            let Some(why) = why_due(&leaf, validity.now, window)? else {
                continue;
            };
            let cert = self.reissue(&leaf, validity)?;
            if leaf.file.ends_with(".crt") {
                bundle.files.insert(leaf.file.clone(), cert);
            } else {
                let text = self.get(&leaf.file)?;
                let old = kubeconfig_field(text, "client-certificate-data")
                    .ok_or_else(|| unreadable(&leaf.file, "no client-certificate-data"))?;
                let updated = text.replacen(old, &b64(&cert), 1);
                bundle.files.insert(leaf.file.clone(), updated);
            }
            renewed.push(Due {
                file: leaf.file,
                why,
            });
        }
        if renewed.is_empty() {
            return Ok(None);
        }
        bundle.renewed = Some(timestamp(validity.now));
        Ok(Some(Renewal { bundle, renewed }))
    }

    /// `leaf`'s certificate issued again: same subject, key and usages,
    /// its names plus the wanted ones, a new serial and lifetime.
    fn reissue(&self, leaf: &Leaf, validity: &Validity) -> Result<String, PkiError> {
        let mut params = CertificateParams::from_ca_cert_pem(&leaf.cert)
            .map_err(|e| unreadable(&leaf.file, e))?;
        for san in &leaf.wanted {
            if !params.subject_alt_names.contains(san) {
                params.subject_alt_names.push(san.clone());
            }
        }
        params.serial_number = Some(super::serial()?);
        params.not_before = validity.now - Duration::hours(1);
        params.not_after = validity.now + validity.leaf;
        let key = KeyPair::from_pem(&leaf.key).map_err(gen_err("loading a leaf key"))?;
        let ca = self.load_ca(leaf.issuer)?;
        let cert = params
            .signed_by(&key, &ca.cert, &ca.key)
            .map_err(gen_err("renewing a leaf certificate"))?;
        Ok(cert.pem())
    }

    /// A line for each CA that ends within [`CA_WARNING`] of `now`.
    pub fn ca_warnings(&self, now: OffsetDateTime) -> Result<Vec<String>, PkiError> {
        let mut warnings = Vec::new();
        for c in self.certificates()?.into_iter().filter(|c| c.ca) {
            if c.not_after - now <= CA_WARNING {
                warnings.push(format!(
                    "the CA in {} ({}) expires {}: leaf renewal cannot go past it; \
                     plan its rotation (see DESIGN.md)",
                    c.file,
                    c.subject,
                    day(c.not_after)
                ));
            }
        }
        Ok(warnings)
    }
}

fn why_due(leaf: &Leaf, now: OffsetDateTime, window: Duration) -> Result<Option<Why>, PkiError> {
    let cert = certificate(&leaf.file, &leaf.cert)?;
    if cert.not_after - now <= window {
        return Ok(Some(Why::Expires(cert.not_after)));
    }
    if leaf.wanted.is_empty() {
        return Ok(None);
    }
    let params =
        CertificateParams::from_ca_cert_pem(&leaf.cert).map_err(|e| unreadable(&leaf.file, e))?;
    let missing: Vec<String> = leaf
        .wanted
        .iter()
        .filter(|san| !params.subject_alt_names.contains(san))
        .map(san_text)
        .collect();
    Ok((!missing.is_empty()).then_some(Why::MissingNames(missing)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::tests::identity;
    use std::net::Ipv4Addr;

    fn epoch() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    /// A bundle issued at `issued`, whose leaves last `leaf_days`.
    fn bundle(issued: OffsetDateTime, leaf_days: i64) -> Bundle {
        let validity = Validity {
            leaf: Duration::days(leaf_days),
            ..Validity::at(issued)
        };
        Bundle::generate_with(&identity(), &validity).unwrap()
    }

    fn x509(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    fn leaf_pem(b: &Bundle, file: &str) -> String {
        if file.ends_with(".crt") {
            b.get(file).unwrap().to_owned()
        } else {
            kubeconfig_credentials(file, b.get(file).unwrap())
                .unwrap()
                .0
        }
    }

    fn issuer_of(file: &str) -> &'static str {
        if file.starts_with("etcd/") || file == "apiserver-etcd-client.crt" {
            "etcd/ca.crt"
        } else if file == "front-proxy-client.crt" {
            "front-proxy-ca.crt"
        } else {
            "ca.crt"
        }
    }

    #[test]
    fn leaves_inside_the_window_are_renewed_by_the_same_ca() {
        let now = epoch();
        let old = bundle(now - Duration::days(335), 365);
        let window = Duration::days(90);
        let due = old.due(&identity(), now, window).unwrap();
        assert_eq!(due.len(), LEAVES.len() + KUBECONFIGS.len(), "{due:?}");

        let renewal = old
            .renew(&identity(), &Validity::at(now), window)
            .unwrap()
            .expect("leaves 30 days from their end are renewed");
        let new = &renewal.bundle;
        assert_eq!(renewal.renewed.len(), due.len());
        assert_eq!(new.renewed.as_deref(), Some("2027-01-15T08:00:00Z"));
        // The CAs, the service-account key and the token stay.
        for kept in [
            "ca.crt",
            "ca.key",
            "etcd/ca.key",
            "front-proxy-ca.crt",
            "sa.key",
            "bootstrap-token",
        ] {
            assert_eq!(new.get(kept).unwrap(), old.get(kept).unwrap(), "{kept}");
        }
        assert_eq!(new.ca_fingerprint().unwrap(), old.ca_fingerprint().unwrap());

        let before = old.certificates().unwrap();
        let after = new.certificates().unwrap();
        for (b, a) in before.iter().zip(&after).filter(|(b, _)| !b.ca) {
            assert_eq!(a.subject, b.subject, "{}", a.file);
            assert_ne!(a.serial, b.serial, "{} keeps its serial", a.file);
            assert!(a.not_after - now > Duration::days(364), "{}", a.file);
            // Signed by the unchanged CA, with the same key and names.
            let der = x509(&leaf_pem(new, &a.file));
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let ca_der = x509(new.get(issuer_of(&a.file)).unwrap());
            let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
            assert!(
                cert.verify_signature(Some(ca.public_key())).is_ok(),
                "{}",
                a.file
            );
            let old_der = x509(&leaf_pem(&old, &a.file));
            let (_, old_cert) = x509_parser::parse_x509_certificate(&old_der).unwrap();
            assert_eq!(
                cert.public_key().raw,
                old_cert.public_key().raw,
                "{}",
                a.file
            );
            assert_eq!(
                cert.subject_alternative_name()
                    .unwrap()
                    .map(|s| s.value.clone()),
                old_cert
                    .subject_alternative_name()
                    .unwrap()
                    .map(|s| s.value.clone()),
                "{}",
                a.file
            );
            assert_eq!(
                cert.extended_key_usage().unwrap().map(|e| e.value.clone()),
                old_cert
                    .extended_key_usage()
                    .unwrap()
                    .map(|e| e.value.clone()),
                "{}",
                a.file
            );
        }
        // Renewed once, nothing is due any more.
        assert!(new.due(&identity(), now, window).unwrap().is_empty());
    }

    #[test]
    fn leaves_far_from_their_end_are_left_alone() {
        let now = epoch();
        let b = bundle(now - Duration::days(165), 365);
        assert!(b
            .due(&identity(), now, Duration::days(90))
            .unwrap()
            .is_empty());
        assert!(b
            .renew(&identity(), &Validity::at(now), Duration::days(90))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_name_the_identity_adds_is_added_at_once() {
        let now = epoch();
        let b = bundle(now - Duration::days(10), 365);
        let mut id = identity();
        id.public_ip = Some(Ipv4Addr::new(198, 51, 100, 9));
        let due = b.due(&id, now, Duration::days(90)).unwrap();
        assert_eq!(
            due,
            vec![Due {
                file: "apiserver.crt".into(),
                why: Why::MissingNames(vec!["198.51.100.9".into()]),
            }]
        );
        let new = b
            .renew(&id, &Validity::at(now), Duration::days(90))
            .unwrap()
            .unwrap()
            .bundle;
        let der = x509(new.get("apiserver.crt").unwrap());
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        use x509_parser::extensions::GeneralName;
        for ip in [[198, 51, 100, 9], [203, 0, 113, 7]] {
            assert!(names
                .iter()
                .any(|n| matches!(n, GeneralName::IPAddress(b) if *b == ip)));
        }
        // Only the API server's certificate changed.
        let changed: Vec<_> = new
            .files
            .iter()
            .filter(|(k, v)| b.files.get(*k) != Some(v))
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(changed, ["apiserver.crt"]);
    }

    #[test]
    fn a_kubeconfig_keeps_its_server_and_ca_and_gets_the_new_certificate() {
        let now = epoch();
        let old = bundle(now - Duration::days(300), 365);
        let new = old
            .renew(&identity(), &Validity::at(now), Duration::days(90))
            .unwrap()
            .unwrap()
            .bundle;
        for &(file, ..) in KUBECONFIGS {
            let (o, n) = (old.get(file).unwrap(), new.get(file).unwrap());
            for field in [
                "server",
                "certificate-authority-data",
                "client-key-data",
                "current-context",
            ] {
                assert_eq!(
                    kubeconfig_field(o, field),
                    kubeconfig_field(n, field),
                    "{file} {field}"
                );
            }
            assert_ne!(
                kubeconfig_field(o, "client-certificate-data"),
                kubeconfig_field(n, "client-certificate-data")
            );
        }
    }

    #[test]
    fn a_ca_near_its_end_is_reported() {
        let now = epoch();
        let young = bundle(now - Duration::days(30), 365);
        assert!(young.ca_warnings(now).unwrap().is_empty());
        let old = bundle(now - Duration::days(3400), 365);
        let warnings = old.ca_warnings(now).unwrap();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("ca.crt"), "{}", warnings[0]);
    }

    #[test]
    fn an_unreadable_certificate_is_named() {
        let mut b = bundle(epoch(), 365);
        b.files
            .insert("etcd/peer.crt".into(), "not a certificate".into());
        let err = b.due(&identity(), epoch(), Duration::days(90)).unwrap_err();
        assert!(err.to_string().contains("etcd/peer.crt"), "{err}");
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(timestamp(epoch()), "2027-01-15T08:00:00Z");
        assert_eq!(day(epoch()), "2027-01-15");
    }
}
