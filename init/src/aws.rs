//! AWS clients, resolved once through the SDK's standard chain (region,
//! credentials from the environment or the instance profile, and
//! `AWS_ENDPOINT_URL`); the stack config may name an endpoint for tests.

use aws_config::{BehaviorVersion, Region};

#[derive(Debug, Clone)]
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub s3: aws_sdk_s3::Client,
    pub cfn: aws_sdk_cloudformation::Client,
    pub region: String,
}

impl Clients {
    pub async fn new(region: Option<&str>, endpoint: Option<&str>) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_owned()));
        }
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        let region = conf.region().map(ToString::to_string).unwrap_or_default();
        // Path-style addressing works with every endpoint, real or local.
        let s3_conf = aws_sdk_s3::config::Builder::from(&conf)
            .force_path_style(endpoint.is_some())
            .build();
        Self {
            ec2: aws_sdk_ec2::Client::new(&conf),
            s3: aws_sdk_s3::Client::from_conf(s3_conf),
            cfn: aws_sdk_cloudformation::Client::new(&conf),
            region,
        }
    }
}

/// An SDK error as one line, with the service's code and message when it gave them.
pub fn describe<E, R>(err: &aws_sdk_ec2::error::SdkError<E, R>) -> String
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    match err.code() {
        Some(code) => format!("{code}: {}", err.message().unwrap_or("")),
        None => match std::error::Error::source(err) {
            Some(s) => format!("{err}: {s}"),
            None => err.to_string(),
        },
    }
}
