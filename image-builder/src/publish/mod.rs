//! `image-builder publish`: a built image becomes a release. The disk goes
//! up as an EBS snapshot (EBS direct APIs), is registered as an AMI in the
//! home region and copied to the others, and the CloudFormation template is
//! rendered with exactly those AMIs. `release.json` ties the image version,
//! the disk's sha256, the AMIs and the template's sha256 together.
//!
//! Publishing is idempotent: the AMI's name is derived from the image
//! version and its tags carry the disk's sha256, so running again reuses
//! what exists, and a different disk under the same version is refused
//! before anything is created. When a run fails, what it created
//! (snapshots, images) is deleted and listed.

pub mod ami;
pub mod rules;
pub mod skew;
pub mod snapshot;
pub mod template;

use crate::manifest::{Built, FileDigest, Manifest};
use crate::progress::{self, Outcome, Progress, StageTiming};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where and how to publish; shared by `publish` and `build --region`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Target {
    /// Region to upload the snapshot to and register the AMI in (publishing
    /// happens only when this is given).
    #[arg(long)]
    pub region: Option<String>,
    /// Further regions to copy the AMI to (comma-separated, or repeated).
    #[arg(long, value_delimiter = ',')]
    pub copy_to: Vec<String>,
    /// CloudFormation template source (default: cfn/template.yaml next to the spec).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Also write SSM parameters `<prefix>/<version>/image-id` and
    /// `<prefix>/latest/image-id` in every region.
    #[arg(long)]
    pub ssm_prefix: Option<String>,
    /// The Kubernetes version the cluster to be updated runs now (e.g.
    /// v1.36.3, the `slipway:kubernetes` tag on its instances): a release
    /// that skips a minor version, or goes back one, is refused before
    /// anything is uploaded.
    #[arg(long, value_name = "VERSION")]
    pub current_kubernetes: Option<String>,
    /// Snapshot blocks uploaded at once.
    #[arg(long, default_value_t = 16)]
    pub upload_concurrency: usize,
    /// AWS endpoint to use instead of AWS's own (a local AWS, for tests).
    #[arg(long, env = "SLIPWAY_AWS_ENDPOINT")]
    pub endpoint_url: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory holding the build (disk.raw, build-manifest.json); the
    /// template and release.json are written there too.
    #[arg(long, short, default_value = "out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub target: Target,
}

impl Args {
    /// `--template`, else `cfn/template.yaml` here.
    pub fn template(&self) -> PathBuf {
        self.target
            .template
            .clone()
            .unwrap_or_else(|| PathBuf::from("cfn/template.yaml"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Io(#[from] crate::fsio::PathError),
    #[error("{action}: {message}")]
    Aws { action: String, message: String },
    #[error(
        "AMI {name} already exists in {region} ({image_id}) with disk sha256 {theirs}, \
         but this image's disk is {ours}: give the image a new version (image.version in the spec)"
    )]
    VersionClash {
        name: String,
        region: String,
        image_id: String,
        theirs: String,
        ours: String,
    },
    #[error("the template breaks the security rules: {0}")]
    Rules(String),
    #[error("publishing needs --region")]
    NoRegion,
    #[error("{0}")]
    Invalid(String),
    #[error("{error}\n  cleaned up: {cleaned}")]
    CleanedUp {
        #[source]
        error: Box<PublishError>,
        cleaned: String,
    },
}

/// Wraps any AWS SDK error with the action that failed.
pub(crate) fn sdk_err<E, R>(
    action: impl Into<String>,
) -> impl FnOnce(aws_sdk_ec2::error::SdkError<E, R>) -> PublishError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    let action = action.into();
    move |e| PublishError::Aws {
        message: match e.code() {
            Some(code) => format!("{code}: {}", e.message().unwrap_or("")),
            None => slipway_init::error_chain(&e, ": "),
        },
        action,
    }
}

/// Polls `state` every `every` until it reports `done`; a state in
/// `failed`, or an hour without `done`, is an error naming `what`.
pub(crate) async fn wait_for_state<F, Fut>(
    what: &str,
    every: std::time::Duration,
    done: &str,
    failed: &[&str],
    mut state: F,
) -> Result<(), PublishError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, PublishError>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60 * 60);
    loop {
        let now = state().await?;
        if now == done {
            return Ok(());
        }
        if failed.contains(&now.as_str()) {
            return Err(PublishError::Invalid(format!("{what} is {now}")));
        }
        if std::time::Instant::now() > deadline {
            return Err(PublishError::Invalid(format!(
                "{what} still {now:?} after an hour"
            )));
        }
        tokio::time::sleep(every).await;
    }
}

/// `release.json`: one image version, one template version, their digests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Release {
    pub name: String,
    pub image_version: String,
    pub template_version: String,
    pub disk_sha256: String,
    /// The Kubernetes version the image ships (its kubelet's).
    #[serde(default)]
    pub kubernetes: String,
    /// Region → AMI ID; the template's RegionMap holds exactly these.
    pub amis: BTreeMap<String, String>,
    pub template: FileDigest,
    /// Present when this run uploaded the disk.
    pub upload: Option<UploadStats>,
    /// The publish's steps, timed, with what each read or made.
    #[serde(default)]
    pub stages: Vec<StageTiming>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UploadStats {
    pub snapshot_id: String,
    pub blocks_sent: usize,
    pub bytes_sent: u64,
    pub disk_bytes: u64,
    pub seconds: f64,
}

/// AWS clients for one region.
#[derive(Debug, Clone)]
pub struct Clients {
    pub region: String,
    pub ec2: aws_sdk_ec2::Client,
    pub ebs: aws_sdk_ebs::Client,
    pub ssm: aws_sdk_ssm::Client,
}

impl Clients {
    /// Clients for the target's regions: `--region` first, then each
    /// `--copy-to` region once.
    pub async fn for_target(target: &Target) -> Result<Vec<Self>, PublishError> {
        let home = target.region.clone().ok_or(PublishError::NoRegion)?;
        let mut regions = vec![home];
        for r in &target.copy_to {
            if !regions.contains(r) {
                regions.push(r.clone());
            }
        }
        let mut clients = Vec::with_capacity(regions.len());
        for r in &regions {
            clients.push(Self::new(r, target.endpoint_url.as_deref()).await);
        }
        Ok(clients)
    }

    pub async fn new(region: &str, endpoint: Option<&str>) -> Self {
        use aws_config::retry::RetryConfig;
        let mut loader = slipway_init::sdk::config_loader()
            .region(aws_config::Region::new(region.to_owned()))
            // Block uploads meet throttling on big disks: back off and retry.
            .retry_config(RetryConfig::standard().with_max_attempts(8));
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        Self {
            region: region.to_owned(),
            ec2: aws_sdk_ec2::Client::new(&conf),
            ebs: aws_sdk_ebs::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
        }
    }
}

/// What this run created, so a failure can undo it.
#[derive(Debug, Default)]
struct Created {
    snapshots: Vec<(Clients, String)>,
    images: Vec<(Clients, String)>,
}

impl Created {
    /// Deletes everything recorded; returns a line saying what went.
    async fn undo(self) -> String {
        let mut gone = Vec::new();
        for (c, id) in self.images.iter().rev() {
            match c.ec2.deregister_image().image_id(id).send().await {
                Ok(_) => gone.push(format!("image {id} in {}", c.region)),
                Err(e) => gone.push(format!("image {id} in {} NOT deleted ({e})", c.region)),
            }
        }
        for (c, id) in self.snapshots.iter().rev() {
            match c.ec2.delete_snapshot().snapshot_id(id).send().await {
                Ok(_) => gone.push(format!("snapshot {id} in {}", c.region)),
                Err(e) => gone.push(format!("snapshot {id} in {} NOT deleted ({e})", c.region)),
            }
        }
        if gone.is_empty() {
            "nothing had been created".into()
        } else {
            gone.join(", ")
        }
    }
}

/// Publishes a build (see the module docs) with `clients`, the home
/// region's first. The disk is read once, for the upload, and only its
/// data blocks; nothing is uploaded for a region that has the AMI already.
pub async fn publish(
    built: &Built,
    clients: &[Clients],
    target: &Target,
    template_source: &Path,
) -> Result<Release, PublishError> {
    let home = clients
        .first()
        .ok_or(PublishError::NoRegion)?
        .region
        .clone();
    let manifest = &built.manifest;
    let progress = Progress::new();
    let kubernetes = kubernetes_version(manifest)?;
    if let Some(current) = &target.current_kubernetes {
        let current = skew::Version::parse(current).map_err(PublishError::Invalid)?;
        skew::check(current, kubernetes).map_err(PublishError::Invalid)?;
    }
    let kubernetes = kubernetes.to_string();
    let versions = template::Versions {
        image: &manifest.version,
        disk_sha256: &manifest.disk.sha256,
        kubernetes: &kubernetes,
    };
    // The template must render and pass its rules before anything is uploaded.
    let placeholder = BTreeMap::from([(home.clone(), "ami-00000000000000000".to_owned())]);
    template::render(template_source, versions, &placeholder)?;
    let id = ami::Identity {
        name: format!("{}-{}", manifest.name, manifest.version),
        version: manifest.version.clone(),
        disk_sha256: manifest.disk.sha256.clone(),
        architecture: ami::Architecture::X86_64,
    };
    // Look before creating anything: a clash anywhere stops the run here.
    let mut amis = BTreeMap::new();
    for c in clients {
        if let Some(existing) = ami::find(&c.ec2, &id.name).await? {
            let image = ami::reuse(&existing, &id, &c.region)?;
            eprintln!("{}: reusing {image} ({})", c.region, id.name);
            amis.insert(c.region.clone(), image);
        }
    }

    let mut created = Created::default();
    let result = async {
        let upload = create_missing(
            clients,
            &id,
            built,
            target,
            &progress,
            &mut amis,
            &mut created,
        )
        .await?;
        if let Some(prefix) = &target.ssm_prefix {
            for c in clients {
                write_parameters(c, prefix, &id.version, &amis[&c.region]).await?;
            }
        }
        Ok(upload)
    }
    .await;
    let upload = match result {
        Ok(u) => u,
        Err(error) => {
            let cleaned = created.undo().await;
            return Err(PublishError::CleanedUp {
                error: Box::new(error),
                cleaned,
            });
        }
    };

    let template_path = built.out.join("template.json");
    let rendered = progress.stage("template", || {
        let rendered = template::render(template_source, versions, &amis)?;
        std::fs::write(&template_path, &rendered)
            .map_err(crate::fsio::at("writing", &template_path))?;
        let note = format!(
            "{} AMIs, {}",
            amis.len(),
            progress::bytes(rendered.len() as u64)
        );
        Ok::<_, PublishError>((rendered, Outcome::built(note)))
    })?;
    let release = Release {
        name: manifest.name.clone(),
        image_version: id.version.clone(),
        template_version: id.version.clone(),
        disk_sha256: id.disk_sha256.clone(),
        kubernetes: kubernetes.clone(),
        amis,
        template: FileDigest {
            file: "template.json".into(),
            size: rendered.len() as u64,
            sha256: crate::cache::sha256_bytes(rendered.as_bytes()),
        },
        upload,
        stages: progress.timings(),
    };
    let release_path = built.out.join("release.json");
    let mut text =
        serde_json::to_string_pretty(&release).map_err(|e| PublishError::Invalid(e.to_string()))?;
    text.push('\n');
    std::fs::write(&release_path, text).map_err(crate::fsio::at("writing", &release_path))?;
    for (region, image) in &release.amis {
        eprintln!("{region}: {image}");
    }
    eprintln!(
        "release {} {} (Kubernetes {}): {} and {}",
        release.name,
        release.image_version,
        release.kubernetes,
        template_path.display(),
        release_path.display()
    );
    eprintln!(
        "to create a cluster from it, or move one to it (the master first, then the nodes, a batch at a time):\n  {}",
        update_command(&home, &template_path, rendered.len())
    );
    Ok(release)
}

/// The Kubernetes version a build ships: its kubelet's.
fn kubernetes_version(manifest: &Manifest) -> Result<skew::Version, PublishError> {
    let kubelet = manifest
        .payload
        .artifacts
        .iter()
        .find(|a| a.name == "kubelet")
        .ok_or_else(|| {
            PublishError::Invalid(
                "the build manifest records no kubelet, so the release's Kubernetes version is unknown"
                    .into(),
            )
        })?;
    skew::Version::parse(&kubelet.version)
        .map_err(|e| PublishError::Invalid(format!("the kubelet's version: {e}")))
}

/// The largest template CloudFormation takes inline; larger ones go
/// through an S3 bucket.
const INLINE_TEMPLATE_BYTES: usize = 51_200;

/// The AWS CLI command that creates a stack from the release's template,
/// or updates one to it keeping every parameter's value (`deploy` reuses
/// the values of parameters it is not given).
pub fn update_command(region: &str, template: &Path, template_bytes: usize) -> String {
    let mut cmd = format!(
        "aws cloudformation deploy --region {region} --stack-name STACK \\\n      --template-file {} --capabilities CAPABILITY_IAM",
        template.display()
    );
    if template_bytes > INLINE_TEMPLATE_BYTES {
        cmd.push_str(" --s3-bucket BUCKET");
    }
    cmd.push_str("\n  (a new stack also needs --parameter-overrides AdminCidr=YOUR-NETWORK/NN)");
    cmd
}

/// Uploads and registers in the home region, then copies to the regions
/// that lack the AMI, recording what it creates.
async fn create_missing(
    clients: &[Clients],
    id: &ami::Identity,
    built: &Built,
    target: &Target,
    progress: &Progress,
    amis: &mut BTreeMap<String, String>,
    created: &mut Created,
) -> Result<Option<UploadStats>, PublishError> {
    let home = &clients[0];
    let mut upload = None;
    if !amis.contains_key(&home.region) {
        let mut snapshot_id = None;
        let uploaded = progress
            .stage_async("upload", async {
                let uploaded = snapshot::upload(
                    &home.ebs,
                    &home.ec2,
                    &built.disk(),
                    &built.data_blocks,
                    &format!("{} disk (sha256 {})", id.name, id.disk_sha256),
                    &id.tags(),
                    target.upload_concurrency,
                    &mut |s| snapshot_id = Some(s.to_owned()),
                )
                .await?;
                let note = format!(
                    "{} of the disk's {} blocks read and sent, {}",
                    uploaded.blocks_sent.len(),
                    uploaded.disk_bytes / snapshot::BLOCK_SIZE,
                    progress::bytes(uploaded.bytes_sent)
                );
                Ok::<_, PublishError>((uploaded, Outcome::built(note)))
            })
            .await;
        if let Some(s) = snapshot_id {
            created.snapshots.push((home.clone(), s));
        }
        let uploaded = uploaded?;
        let image = progress
            .stage_async("register", async {
                let image = ami::register(&home.ec2, id, &uploaded.snapshot_id).await?;
                created.images.push((home.clone(), image.clone()));
                ami::wait_available(&home.ec2, &image).await?;
                let note = format!("{image} in {}", home.region);
                Ok::<_, PublishError>((image, Outcome::built(note)))
            })
            .await?;
        upload = Some(UploadStats {
            snapshot_id: uploaded.snapshot_id.clone(),
            blocks_sent: uploaded.blocks_sent.len(),
            bytes_sent: uploaded.bytes_sent,
            disk_bytes: uploaded.disk_bytes,
            seconds: uploaded.seconds,
        });
        amis.insert(home.region.clone(), image);
    }
    let source = amis[&home.region].clone();
    let mut copies = tokio::task::JoinSet::new();
    for c in clients.iter().skip(1) {
        if amis.contains_key(&c.region) {
            continue;
        }
        let (c, id, source, from) = (c.clone(), id.clone(), source.clone(), home.region.clone());
        copies.spawn(async move {
            match ami::copy(&c.ec2, &id, &from, &source).await {
                Ok(image) => {
                    let ready = ami::wait_available(&c.ec2, &image).await;
                    (c, Some(image), ready)
                }
                Err(e) => (c, None, Err(e)),
            }
        });
    }
    if copies.is_empty() {
        return Ok(upload);
    }
    let regions = copies.len();
    progress
        .stage_async("copies", async {
            let mut first_error = None;
            while let Some(joined) = copies.join_next().await {
                let (c, image, ready) = joined
                    .map_err(|e| PublishError::Invalid(format!("a copy task failed: {e}")))?;
                if let Some(image) = &image {
                    created.images.push((c.clone(), image.clone()));
                }
                match (image, ready) {
                    (Some(image), Ok(())) => {
                        eprintln!("{}: copied {image}", c.region);
                        amis.insert(c.region.clone(), image);
                    }
                    (_, Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    (None, Ok(())) => {}
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(((), Outcome::built(format!("to {regions} regions")))),
            }
        })
        .await?;
    Ok(upload)
}

async fn write_parameters(
    c: &Clients,
    prefix: &str,
    version: &str,
    image: &str,
) -> Result<(), PublishError> {
    let prefix = prefix.trim_end_matches('/');
    for name in [
        format!("{prefix}/{version}/image-id"),
        format!("{prefix}/latest/image-id"),
    ] {
        c.ssm
            .put_parameter()
            .name(&name)
            .value(image)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .map_err(sdk_err(format!(
                "writing SSM parameter {name} in {}",
                c.region
            )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_reads_back_as_written_upload_time_included() {
        let release = Release {
            name: "slipway".into(),
            image_version: "0.1.0".into(),
            template_version: "0.1.0".into(),
            disk_sha256: "00".repeat(32),
            kubernetes: "v1.37.2".into(),
            amis: BTreeMap::from([("us-east-1".into(), "ami-0123456789abcdef0".into())]),
            template: FileDigest {
                file: "template.json".into(),
                size: 1,
                sha256: "11".repeat(32),
            },
            upload: Some(UploadStats {
                snapshot_id: "snap-0123456789abcdef0".into(),
                blocks_sent: 1,
                bytes_sent: 1 << 19,
                disk_bytes: 1 << 30,
                // Without exact float parsing this comes back one bit off.
                seconds: 21.955126495000002,
            }),
            stages: vec![StageTiming {
                stage: "upload".into(),
                seconds: 1.5,
                cached: false,
                note: "1 of the disk's 2048 blocks read and sent, 512.0 KiB".into(),
            }],
        };
        let text = serde_json::to_string_pretty(&release).unwrap();
        assert_eq!(serde_json::from_str::<Release>(&text).unwrap(), release);
    }
}
