//! The cluster's PKI in kubeadm's layout and set: the three CAs, the API
//! server's serving and client certificates, etcd's, the front proxy's, the
//! service-account key pair, the component kubeconfigs and a bootstrap
//! token. Generated once (on the first master boot), held in memory as a
//! [`Bundle`] and written only below the tmpfs.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use time::{Duration, OffsetDateTime};

mod renew;
mod token;
pub use renew::{
    certificate, day, kubeconfig_credentials, kubeconfig_token, timestamp, Certificate, Due,
    Renewal, Why, CA_WARNING,
};
pub use token::{token_id, Rotation};

/// How long a CA lasts (kubeadm's ten years).
pub const CA_DAYS: i64 = 3650;
/// How long a leaf certificate lasts (kubeadm's one year).
pub const LEAF_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the PKI bundle lacks {0}")]
    Incomplete(String),
    #[error("the PKI bundle's {file} is not a certificate this code can read: {message}")]
    Unreadable { file: String, message: String },
    #[error("random source: {0}")]
    Random(std::io::Error),
}

/// Every file of the cluster's PKI, by its path relative to the PKI root
/// (`ca.crt`, `etcd/server.key`, `admin.conf`, …), and when its leaf
/// certificates were last renewed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    pub files: BTreeMap<String, String>,
    /// RFC 3339 time of the last renewal; absent until the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed: Option<String>,
    /// RFC 3339 time the bootstrap token expires; absent in bundles made
    /// before tokens expired (such a token is replaced at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires: Option<String>,
}

/// What the certificates must name.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster_name: String,
    /// The API's name inside the VPC, which kubelets dial.
    pub api_name: String,
    /// Every address the stack reserves for a master (one per zone): the
    /// certificates are shared by the masters of every zone.
    pub master_ips: Vec<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
    pub api_service_ip: Ipv4Addr,
}

impl Identity {
    /// What a stack's certificates must name; `public_ip` is the master's
    /// Elastic IP once it holds it.
    pub fn of(config: &crate::config::StackConfig, public_ip: Option<Ipv4Addr>) -> Self {
        Self {
            cluster_name: config.cluster_name.clone(),
            api_name: config.api_name.clone(),
            master_ips: config.master_addresses().collect(),
            public_ip,
            api_service_ip: config.api_service_ip(),
        }
    }
}

/// When certificates are issued and how long they last: the clock is an
/// input, so renewal can be tested at any point of a cluster's life.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub now: OffsetDateTime,
    pub ca: Duration,
    pub leaf: Duration,
    /// How long a bootstrap token lasts.
    pub token: Duration,
}

impl Validity {
    /// kubeadm's lifetimes, starting at `now`.
    pub fn at(now: OffsetDateTime) -> Self {
        Self {
            now,
            ca: Duration::days(CA_DAYS),
            leaf: Duration::days(LEAF_DAYS),
            token: Duration::hours(i64::from(crate::config::TOKEN_HOURS)),
        }
    }

    /// kubeadm's lifetimes, starting now.
    pub fn now() -> Self {
        Self::at(OffsetDateTime::now_utc())
    }
}

/// Files a node needs to join; the rest stays with the masters.
pub const NODE_FILES: &[&str] = &["ca.crt", "bootstrap-kubelet.conf"];

/// The key the API server encrypts Secrets in etcd with (32 random bytes,
/// base64): made with the PKI, kept only in the bundle and on the tmpfs.
pub const ENCRYPTION_KEY: &str = "encryption.key";

/// The three CAs, by the stem of their files (`<stem>.crt`, `<stem>.key`).
pub const CAS: &[&str] = &["ca", "etcd/ca", "front-proxy-ca"];

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

/// A random serial: 16 bytes, positive. (rcgen's default derives the
/// serial from the public key, which a renewal keeps.)
fn serial() -> Result<rcgen::SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom(&mut bytes)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// A subject of organisations `orgs` and common name `cn`, as Kubernetes
/// reads users (`O` = groups, `CN` = name).
pub fn subject(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn params(
    cn: &str,
    orgs: &[&str],
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject(cn, orgs);
    p.serial_number = Some(serial()?);
    p.not_before = now - Duration::hours(1);
    p.not_after = now + lifetime;
    Ok(p)
}

fn new_ca(cn: &str, validity: &Validity, what: &'static str) -> Result<Ca, PkiError> {
    let key = KeyPair::generate().map_err(gen_err(what))?;
    let mut p = params(cn, &[], validity.now, validity.ca)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).map_err(gen_err(what))?;
    Ok(Ca { cert, key })
}

#[derive(Clone, Copy)]
enum Usage {
    Server,
    Client,
    Both,
}

/// One leaf certificate of the set: its file stem, the stem of the CA
/// that issues it, its subject and what it is for.
struct LeafSpec {
    stem: &'static str,
    issuer: &'static str,
    cn: &'static str,
    orgs: &'static [&'static str],
    usage: Usage,
}

/// The leaf certificates kept as `<stem>.crt` and `<stem>.key`.
const LEAVES: &[LeafSpec] = &[
    LeafSpec {
        stem: "apiserver",
        issuer: "ca",
        cn: "kube-apiserver",
        orgs: &[],
        usage: Usage::Server,
    },
    LeafSpec {
        stem: "apiserver-kubelet-client",
        issuer: "ca",
        cn: "kube-apiserver-kubelet-client",
        orgs: &["kubeadm:cluster-admins"],
        usage: Usage::Client,
    },
    LeafSpec {
        stem: "front-proxy-client",
        issuer: "front-proxy-ca",
        cn: "front-proxy-client",
        orgs: &[],
        usage: Usage::Client,
    },
    LeafSpec {
        stem: "etcd/server",
        issuer: "etcd/ca",
        cn: "etcd-server",
        orgs: &[],
        usage: Usage::Both,
    },
    LeafSpec {
        stem: "etcd/peer",
        issuer: "etcd/ca",
        cn: "etcd-peer",
        orgs: &[],
        usage: Usage::Both,
    },
    LeafSpec {
        stem: "etcd/healthcheck-client",
        issuer: "etcd/ca",
        cn: "kube-etcd-healthcheck-client",
        orgs: &[],
        usage: Usage::Client,
    },
    LeafSpec {
        stem: "apiserver-etcd-client",
        issuer: "etcd/ca",
        cn: "kube-apiserver-etcd-client",
        orgs: &[],
        usage: Usage::Client,
    },
];

/// The kubeconfigs with a client certificate from the cluster CA:
/// (file, common name and user, organisations, whether it is used from
/// outside the master, through [`admin_server`], rather than on loopback).
const KUBECONFIGS: &[(&str, &str, &[&str], bool)] = &[
    (
        "admin.conf",
        "kubernetes-admin",
        &["kubeadm:cluster-admins"],
        true,
    ),
    (
        "super-admin.conf",
        "kubernetes-super-admin",
        &["system:masters"],
        false,
    ),
    (
        "controller-manager.conf",
        "system:kube-controller-manager",
        &[],
        false,
    ),
    ("scheduler.conf", "system:kube-scheduler", &[], false),
];

/// Where an administrator reaches the API server: the Elastic IP (the
/// stack's API endpoint) once the master holds it, else the API's name
/// inside the VPC.
pub fn admin_server(id: &Identity) -> String {
    match id.public_ip {
        Some(ip) => format!("https://{ip}:6443"),
        None => member_server(id),
    }
}

/// Where the cluster's members reach the API server: its name inside the
/// VPC, which follows the master from zone to zone.
pub fn member_server(id: &Identity) -> String {
    format!("https://{}:6443", id.api_name)
}

/// The `server:` of a kubeconfig.
fn kubeconfig_server(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("server: "))
        .map(str::trim)
}

/// The SANs `stem`'s certificate must carry for `id`; empty for clients.
fn wanted_sans(stem: &str, id: &Identity) -> Result<Vec<SanType>, PkiError> {
    let ip = |a: Ipv4Addr| SanType::IpAddress(IpAddr::V4(a));
    Ok(match stem {
        "apiserver" => {
            let mut sans = vec![
                dns("kubernetes")?,
                dns("kubernetes.default")?,
                dns("kubernetes.default.svc")?,
                dns("kubernetes.default.svc.cluster.local")?,
                dns("localhost")?,
                dns(&id.api_name)?,
                ip(id.api_service_ip),
                ip(Ipv4Addr::LOCALHOST),
            ];
            sans.extend(id.master_ips.iter().copied().map(ip));
            sans.extend(id.public_ip.map(ip));
            sans
        }
        "etcd/server" | "etcd/peer" => {
            let mut sans = vec![dns("localhost")?, ip(Ipv4Addr::LOCALHOST)];
            sans.extend(id.master_ips.iter().copied().map(ip));
            sans
        }
        _ => Vec::new(),
    })
}

fn usages(p: &mut CertificateParams, usage: Usage) {
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = match usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Both => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
}

/// A CA to sign with, from its certificate and key (PEM).
fn ca_from_pem(crt: &str, key: &str) -> Result<Ca, PkiError> {
    let key = KeyPair::from_pem(key).map_err(gen_err("loading a CA key"))?;
    let params =
        CertificateParams::from_ca_cert_pem(crt).map_err(gen_err("loading a CA certificate"))?;
    // Re-signing the same subject with the same key yields an issuer
    // whose signatures verify against the original CA certificate.
    let cert = params.self_signed(&key).map_err(gen_err("loading a CA"))?;
    Ok(Ca { cert, key })
}

/// The certificate (PEM) for a kubelet's client certificate request
/// (`csr`, PKCS#10 PEM), signed by the CA `ca_crt`/`ca_key` as the
/// controller manager's `kube-apiserver-client-kubelet` signer signs it:
/// the request's subject and key, no SANs, client authentication, a
/// leaf's lifetime. Whether the request deserves it is the approver's
/// judgement, made before.
pub fn sign_kubelet_client(
    csr: &str,
    ca_crt: &str,
    ca_key: &str,
    validity: &Validity,
) -> Result<String, PkiError> {
    const WHAT: &str = "a kubelet's client certificate";
    let ca = ca_from_pem(ca_crt, ca_key)?;
    let mut request =
        rcgen::CertificateSigningRequestParams::from_pem(csr).map_err(gen_err(WHAT))?;
    let subject = request.params.distinguished_name.clone();
    let mut p = params("", &[], validity.now, validity.leaf)?;
    p.distinguished_name = subject;
    usages(&mut p, Usage::Client);
    request.params = p;
    let cert = request
        .signed_by(&ca.cert, &ca.key)
        .map_err(gen_err(WHAT))?;
    Ok(cert.pem())
}

/// The control-plane components that serve on a loopback port of their
/// own (health, metrics) with a certificate made at each boot
/// ([`loopback_serving`]): by the stem of its files below the pki
/// directory (`<stem>.crt`, `<stem>.key`), and its common name.
pub const LOOPBACK_SERVING: &[(&str, &str)] = &[
    ("controller-manager-serving", "kube-controller-manager"),
    ("scheduler-serving", "kube-scheduler"),
];

/// A new P-256 key and a self-signed certificate for it, for `cn`'s own
/// port on the loopback (`127.0.0.1`, `localhost`): (cert PEM, key PEM).
/// Given none, the controller manager and the scheduler make an RSA-2048
/// pair at every start, about two seconds of CPU under emulation while
/// the control plane starts; this pair costs a few milliseconds. Like
/// theirs it is self-signed, so no client can verify it and its lifetime
/// (the CAs') only has to outlast the boot that makes it.
pub fn loopback_serving(cn: &str, validity: &Validity) -> Result<(String, String), PkiError> {
    const WHAT: &str = "a loopback serving certificate";
    let key = KeyPair::generate().map_err(gen_err(WHAT))?;
    let mut p = params(cn, &[], validity.now, validity.ca)?;
    p.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        dns("localhost")?,
    ];
    usages(&mut p, Usage::Server);
    let cert = p.self_signed(&key).map_err(gen_err(WHAT))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A new key and a certificate for it, signed by `ca`: (cert PEM, key PEM).
fn leaf(
    ca: &Ca,
    cn: &str,
    orgs: &[&str],
    usage: Usage,
    sans: Vec<SanType>,
    validity: &Validity,
    what: &'static str,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(gen_err(what))?;
    let mut p = params(cn, orgs, validity.now, validity.leaf)?;
    p.subject_alt_names = sans;
    usages(&mut p, usage);
    let cert = p
        .signed_by(&key, &ca.cert, &ca.key)
        .map_err(gen_err(what))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn dns(name: &str) -> Result<SanType, PkiError> {
    Ok(SanType::DnsName(
        name.try_into().map_err(gen_err("a DNS name"))?,
    ))
}

/// Standard base64; reading takes it with or without padding.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

pub(crate) fn b64(data: impl AsRef<[u8]>) -> String {
    base64::Engine::encode(&BASE64, data)
}

/// A kubeconfig with embedded credentials.
pub fn kubeconfig(
    cluster: &str,
    server: &str,
    ca_pem: &str,
    user: &str,
    auth: &KubeAuth<'_>,
) -> String {
    let creds = match auth {
        KubeAuth::Cert { cert, key } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert),
            b64(key)
        ),
        KubeAuth::Token(t) => format!("    token: {t}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\ncontexts:\n- name: {user}@{cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\ncurrent-context: {user}@{cluster}\nusers:\n- name: {user}\n  user:\n{creds}",
        b64(ca_pem)
    )
}

#[derive(Debug)]
pub enum KubeAuth<'a> {
    Cert { cert: &'a str, key: &'a str },
    Token(&'a str),
}

fn random_token_part(len: usize) -> Result<String, PkiError> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len * 2];
    getrandom(&mut bytes)?;
    // Rejection sampling keeps the alphabet uniform.
    let mut out = String::new();
    let mut i = 0;
    while out.len() < len {
        if i == bytes.len() {
            getrandom(&mut bytes)?;
            i = 0;
        }
        let b = bytes[i];
        i += 1;
        if usize::from(b) < 252 {
            out.push(ALPHABET[usize::from(b) % 36] as char);
        }
    }
    Ok(out)
}

/// A fresh key for the API server's `aescbc` provider: 32 bytes, base64.
fn encryption_key() -> Result<String, PkiError> {
    let mut key = [0u8; 32];
    getrandom(&mut key)?;
    Ok(b64(key))
}

fn getrandom(buf: &mut [u8]) -> Result<(), PkiError> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(PkiError::Random)
}

/// A kubeadm-style bootstrap token: `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn bootstrap_token() -> Result<String, PkiError> {
    Ok(format!(
        "{}.{}",
        random_token_part(6)?,
        random_token_part(16)?
    ))
}

impl Bundle {
    /// Generates the full set for a new cluster, valid from now.
    pub fn generate(id: &Identity) -> Result<Self, PkiError> {
        Self::generate_with(id, &Validity::now())
    }

    /// Generates the full set for a new cluster with the given validity.
    pub fn generate_with(id: &Identity, validity: &Validity) -> Result<Self, PkiError> {
        let mut files = BTreeMap::new();
        let ca = new_ca("kubernetes", validity, "the cluster CA")?;
        let etcd_ca = new_ca("etcd-ca", validity, "the etcd CA")?;
        let fp_ca = new_ca("front-proxy-ca", validity, "the front-proxy CA")?;
        let ca_pem = ca.cert.pem();
        for (stem, issuer) in [
            ("ca", &ca),
            ("etcd/ca", &etcd_ca),
            ("front-proxy-ca", &fp_ca),
        ] {
            files.insert(format!("{stem}.crt"), issuer.cert.pem());
            files.insert(format!("{stem}.key"), issuer.key.serialize_pem());
        }
        for spec in LEAVES {
            let issuer = match spec.issuer {
                "etcd/ca" => &etcd_ca,
                "front-proxy-ca" => &fp_ca,
                _ => &ca,
            };
            let sans = wanted_sans(spec.stem, id)?;
            let (cert, key) = leaf(
                issuer,
                spec.cn,
                spec.orgs,
                spec.usage,
                sans,
                validity,
                "a leaf certificate",
            )?;
            files.insert(format!("{}.crt", spec.stem), cert);
            files.insert(format!("{}.key", spec.stem), key);
        }

        let sa = KeyPair::generate().map_err(gen_err("the service-account key"))?;
        files.insert("sa.key".into(), sa.serialize_pem());
        files.insert("sa.pub".into(), sa.public_key_pem());
        files.insert(ENCRYPTION_KEY.into(), encryption_key()?);

        let local = "https://127.0.0.1:6443";
        // Kubelets use the API's name; administrators the Elastic IP.
        let public = member_server(id);
        let admin = admin_server(id);
        for &(file, user, orgs, remote) in KUBECONFIGS {
            let (cert, key) = leaf(
                &ca,
                user,
                orgs,
                Usage::Client,
                vec![],
                validity,
                "a kubeconfig certificate",
            )?;
            let server = if remote { admin.as_str() } else { local };
            let auth = KubeAuth::Cert {
                cert: &cert,
                key: &key,
            };
            files.insert(
                file.into(),
                kubeconfig(&id.cluster_name, server, &ca_pem, user, &auth),
            );
        }
        let token = bootstrap_token()?;
        files.insert(
            "bootstrap-kubelet.conf".into(),
            kubeconfig(
                &id.cluster_name,
                &public,
                &ca_pem,
                "kubelet-bootstrap",
                &KubeAuth::Token(&token),
            ),
        );
        files.insert("bootstrap-token".into(), token);
        Ok(Self {
            files,
            renewed: None,
            token_expires: Some(renew::timestamp(validity.now + validity.token)),
        })
    }

    pub fn get(&self, path: &str) -> Result<&str, PkiError> {
        self.files
            .get(path)
            .map(String::as_str)
            .ok_or_else(|| PkiError::Incomplete(path.to_owned()))
    }

    /// The subset a node needs.
    pub fn node_bundle(&self) -> Result<Bundle, PkiError> {
        let mut files = BTreeMap::new();
        for f in NODE_FILES {
            files.insert((*f).to_owned(), self.get(f)?.to_owned());
        }
        Ok(Bundle {
            files,
            renewed: None,
            token_expires: self.token_expires.clone(),
        })
    }

    /// This bundle brought up to date for `id`: what a bundle of an older
    /// release lacks (the Secrets encryption key) added, `admin.conf`
    /// pointed at [`admin_server`] (the Elastic IP, once known) and the
    /// kubelets' bootstrap kubeconfig at [`member_server`]; `None` when
    /// nothing changes.
    pub fn completed(&self, id: &Identity) -> Result<Option<Bundle>, PkiError> {
        let mut bundle = self.clone();
        if !bundle.files.contains_key(ENCRYPTION_KEY) {
            bundle
                .files
                .insert(ENCRYPTION_KEY.to_owned(), encryption_key()?);
        }
        for (file, wanted) in [
            ("admin.conf", admin_server(id)),
            ("bootstrap-kubelet.conf", member_server(id)),
        ] {
            let text = self.get(file)?;
            if let Some(server) = kubeconfig_server(text).filter(|s| *s != wanted) {
                let updated = text.replacen(
                    &format!("server: {server}"),
                    &format!("server: {wanted}"),
                    1,
                );
                bundle.files.insert(file.to_owned(), updated);
            }
        }
        Ok((bundle != *self).then_some(bundle))
    }

    /// Writes every file below `dir` (which must be on tmpfs): keys and
    /// kubeconfigs 0600, certificates 0644, directories 0700.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        for (rel, content) in &self.files {
            if rel.contains("..") || rel.starts_with('/') {
                return Err(PkiError::Incomplete(format!("a safe path (got {rel:?})")));
            }
            let public = rel.ends_with(".crt") || rel.ends_with(".pub");
            let mode = if public { 0o644 } else { 0o600 };
            write_file(&dir.join(rel), content.as_bytes(), mode, 0o700)?;
        }
        Ok(())
    }

    /// A CA loaded back from the bundle to sign with, by its stem.
    fn load_ca(&self, stem: &str) -> Result<Ca, PkiError> {
        ca_from_pem(
            self.get(&format!("{stem}.crt"))?,
            self.get(&format!("{stem}.key"))?,
        )
    }

    /// A kubeconfig for a master's own kubelet (`system:node:<name>`),
    /// signed here because that kubelet must run the API server before
    /// it could ask the API server for a certificate.
    pub fn kubelet_kubeconfig(
        &self,
        node_name: &str,
        server: &str,
        cluster: &str,
    ) -> Result<String, PkiError> {
        let ca = self.load_ca("ca")?;
        let user = format!("system:node:{node_name}");
        let (cert, key) = leaf(
            &ca,
            &user,
            &["system:nodes"],
            Usage::Client,
            vec![],
            &Validity::now(),
            "the kubelet's client certificate",
        )?;
        Ok(kubeconfig(
            cluster,
            server,
            self.get("ca.crt")?,
            &user,
            &KubeAuth::Cert {
                cert: &cert,
                key: &key,
            },
        ))
    }

    /// SHA-256 of the cluster CA certificate's DER: the fingerprint that
    /// must never change over the cluster's life.
    pub fn ca_fingerprint(&self) -> Result<String, PkiError> {
        use sha2::Digest;
        let pem = self.get("ca.crt")?;
        let der = pem_body(pem).ok_or_else(|| PkiError::Incomplete("a PEM ca.crt".to_owned()))?;
        Ok(hex::encode(sha2::Sha256::digest(der)))
    }
}

/// How a secret is named in a message: the first 12 hex digits of its
/// sha256, enough to tell two apart, useless to an attacker.
pub fn fingerprint(secret: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
    digest[..12].to_owned()
}

/// Writes `content` to `path` atomically (a temporary file, then a rename)
/// with `mode`, creating missing parents with `dir_mode`.
pub fn write_file(path: &Path, content: &[u8], mode: u32, dir_mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let werr = |p: &Path| {
        let path = p.display().to_string();
        move |source| PkiError::Write { path, source }
    };
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(parent)
            .map_err(werr(parent))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    std::io::Write::write_all(&mut f, content).map_err(werr(&tmp))?;
    std::fs::rename(&tmp, path).map_err(werr(path))
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    b64_decode(&body)
}

pub(crate) fn b64_decode(s: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&BASE64, s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity the PKI's tests issue for.
    pub(super) fn identity() -> Identity {
        Identity {
            cluster_name: "demo".into(),
            api_name: "api.demo.slipway.internal".into(),
            master_ips: vec![Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 2, 10)],
            public_ip: Some(Ipv4Addr::new(203, 0, 113, 7)),
            api_service_ip: Ipv4Addr::new(10, 96, 0, 1),
        }
    }

    #[test]
    fn a_loopback_serving_pair_is_self_signed_p256_for_the_loopback_only() {
        let now = OffsetDateTime::now_utc();
        let (crt, key) = loopback_serving("kube-scheduler", &Validity::at(now)).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let (_, pem) = x509_parser::pem::parse_x509_pem(crt.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.issuer(), cert.subject());
        cert.verify_signature(None).unwrap();
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "kube-scheduler");
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["IPAddress(7f:00:00:01)", "DNSName(localhost)"]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth, "{eku:?}");
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.to_datetime() - now).whole_days();
        assert!(days >= CA_DAYS - 1, "{days}");
    }

    #[test]
    fn the_secrets_key_is_made_with_the_pki_added_to_an_old_bundle_and_kept_from_nodes() {
        let b = Bundle::generate(&identity()).unwrap();
        let key = b.get(ENCRYPTION_KEY).unwrap();
        assert_eq!(b64_decode(key).unwrap().len(), 32);
        assert!(
            b.completed(&identity()).unwrap().is_none(),
            "a new bundle lacks nothing"
        );
        assert!(b.node_bundle().unwrap().get(ENCRYPTION_KEY).is_err());

        let mut old = b.clone();
        old.files.remove(ENCRYPTION_KEY);
        let done = old.completed(&identity()).unwrap().expect("the key added");
        let added = done.get(ENCRYPTION_KEY).unwrap();
        assert_eq!(b64_decode(added).unwrap().len(), 32);
        assert_ne!(added, key, "a fresh key, not a fixed one");
        // Everything else as it was.
        let mut without = done.clone();
        without.files.remove(ENCRYPTION_KEY);
        assert_eq!(without, old);
    }

    #[test]
    fn administrators_reach_the_elastic_ip_and_an_old_admin_conf_is_pointed_there() {
        let id = identity();
        let b = Bundle::generate(&id).unwrap();
        let admin = b.get("admin.conf").unwrap();
        assert_eq!(kubeconfig_server(admin), Some("https://203.0.113.7:6443"));
        // Kubelets dial the API's name.
        let boot = b.get("bootstrap-kubelet.conf").unwrap();
        assert_eq!(
            kubeconfig_server(boot),
            Some("https://api.demo.slipway.internal:6443")
        );
        // A bundle made before the address was known (or by an older
        // release) is pointed at it, and nothing else changes.
        let before = Bundle::generate(&Identity {
            public_ip: None,
            ..id.clone()
        })
        .unwrap();
        assert_eq!(
            kubeconfig_server(before.get("admin.conf").unwrap()),
            Some("https://api.demo.slipway.internal:6443")
        );
        let after = before.completed(&id).unwrap().expect("admin.conf updated");
        assert_eq!(
            kubeconfig_server(after.get("admin.conf").unwrap()),
            Some("https://203.0.113.7:6443")
        );
        for (file, content) in &before.files {
            if file != "admin.conf" {
                assert_eq!(after.get(file).unwrap(), content, "{file} changed");
            }
        }
        assert!(after.completed(&id).unwrap().is_none());
    }

    #[test]
    fn an_old_bundle_sends_kubelets_to_the_apis_name_and_reissues_what_lacks_it() {
        let id = identity();
        // A bundle of a release whose kubelets dialled the master's address.
        let mut old = Bundle::generate(&id).unwrap();
        let boot = old.get("bootstrap-kubelet.conf").unwrap().replacen(
            "server: https://api.demo.slipway.internal:6443",
            "server: https://10.0.1.250:6443",
            1,
        );
        old.files.insert("bootstrap-kubelet.conf".into(), boot);
        let done = old.completed(&id).unwrap().expect("the kubeconfig updated");
        assert_eq!(
            kubeconfig_server(done.get("bootstrap-kubelet.conf").unwrap()),
            Some("https://api.demo.slipway.internal:6443")
        );
        // Its certificates named one address and no name: the API server's
        // and etcd's are due at once, however far their end.
        let narrow = Identity {
            api_name: "api.old.slipway.internal".into(),
            master_ips: vec![Ipv4Addr::new(10, 0, 1, 250)],
            ..id.clone()
        };
        let issued = Bundle::generate(&narrow).unwrap();
        let due: Vec<String> = issued
            .due(&id, OffsetDateTime::now_utc(), Duration::days(1))
            .unwrap()
            .into_iter()
            .map(|d| d.file)
            .collect();
        for stem in ["apiserver.crt", "etcd/server.crt", "etcd/peer.crt"] {
            assert!(due.iter().any(|f| f == stem), "{stem} not due: {due:?}");
        }
    }

    #[test]
    fn the_full_kubeadm_set_is_generated() {
        let b = Bundle::generate(&identity()).unwrap();
        for f in [
            "ca.crt",
            "ca.key",
            "apiserver.crt",
            "apiserver.key",
            "apiserver-kubelet-client.crt",
            "front-proxy-ca.crt",
            "front-proxy-client.key",
            "etcd/ca.crt",
            "etcd/server.crt",
            "etcd/peer.key",
            "etcd/healthcheck-client.crt",
            "apiserver-etcd-client.key",
            "sa.key",
            "sa.pub",
            "admin.conf",
            "controller-manager.conf",
            "scheduler.conf",
            "bootstrap-kubelet.conf",
            "bootstrap-token",
        ] {
            assert!(b.files.contains_key(f), "missing {f}");
        }
        let token = b.get("bootstrap-token").unwrap();
        assert_eq!(token.len(), 23);
        assert!(token
            .chars()
            .all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(b.ca_fingerprint().unwrap().len(), 64);
    }

    #[test]
    fn the_apiserver_certificate_names_every_address() {
        let b = Bundle::generate(&identity()).unwrap();
        let der = pem_body(b.get("apiserver.crt").unwrap()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        use x509_parser::extensions::GeneralName;
        let names = &san.value.general_names;
        assert!(names.iter().any(|n| matches!(
            n,
            GeneralName::DNSName("kubernetes.default.svc.cluster.local")
        )));
        for ip in [[10, 96, 0, 1], [10, 0, 1, 10], [203, 0, 113, 7]] {
            assert!(
                names
                    .iter()
                    .any(|n| matches!(n, GeneralName::IPAddress(b) if *b == ip)),
                "{ip:?} not in {names:?}"
            );
        }
        // Signed by the cluster CA.
        let ca_der = pem_body(b.get("ca.crt").unwrap()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[test]
    fn a_masters_kubelet_certificate_is_signed_by_the_loaded_ca() {
        let b = Bundle::generate(&identity()).unwrap();
        let conf = b
            .kubelet_kubeconfig("ip-10-0-1-10", "https://10.0.1.10:6443", "demo")
            .unwrap();
        let data = conf
            .lines()
            .find_map(|l| l.trim().strip_prefix("client-certificate-data: "))
            .unwrap();
        let pem = String::from_utf8(b64_decode(data).unwrap()).unwrap();
        let der = pem_body(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.subject().to_string(),
            "O=system:nodes, CN=system:node:ip-10-0-1-10"
        );
        let ca_der = pem_body(b.get("ca.crt").unwrap()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
        // A different CA's key must not verify it.
        let other = Bundle::generate(&identity()).unwrap();
        let other_der = pem_body(other.get("ca.crt").unwrap()).unwrap();
        let (_, other) = x509_parser::parse_x509_certificate(&other_der).unwrap();
        assert!(cert.verify_signature(Some(other.public_key())).is_err());
    }

    #[test]
    fn two_generations_have_different_cas() {
        let a = Bundle::generate(&identity()).unwrap();
        let b = Bundle::generate(&identity()).unwrap();
        assert_ne!(a.ca_fingerprint().unwrap(), b.ca_fingerprint().unwrap());
    }

    #[test]
    fn keys_are_written_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let b = Bundle::generate(&identity()).unwrap();
        b.write(dir.path()).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("etcd/server.key"), 0o600);
        assert_eq!(mode("admin.conf"), 0o600);
        assert_eq!(mode("ca.crt"), 0o644);
        assert_eq!(mode("etcd"), 0o700);
    }
}
