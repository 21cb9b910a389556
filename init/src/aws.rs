//! AWS clients, resolved once through the SDK's standard chain (region,
//! credentials from the environment or the instance profile, and
//! `AWS_ENDPOINT_URL`); the stack config may name an endpoint for tests.
//! Every call goes through one retry policy: throttling, 5xx answers,
//! resets and timeouts are retried with jittered exponential backoff, each
//! attempt and each call bounded in time.

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::Region;
use std::time::Duration;

/// How every AWS call of a boot is retried and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// The first backoff; it doubles (with full jitter) up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// One attempt: connection, request and the whole response.
    pub attempt_timeout: Duration,
    /// The call, every attempt and backoff included.
    pub operation_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for CallPolicy {
    /// Enough attempts to ride out an account's throttling (EC2's token
    /// buckets refill within seconds), short enough that a dead endpoint is
    /// reported within minutes.
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(4 * 60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl CallPolicy {
    /// The same attempts with short waits, for tests against a local AWS.
    pub fn quick() -> Self {
        Self {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            ..Self::default()
        }
    }

    fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(self.max_backoff)
    }

    fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .operation_attempt_timeout(self.attempt_timeout)
            .operation_timeout(self.operation_timeout)
            .build()
    }
}

#[derive(Debug, Clone)]
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub s3: aws_sdk_s3::Client,
    pub cfn: aws_sdk_cloudformation::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub route53: aws_sdk_route53::Client,
    pub region: String,
}

impl Clients {
    /// Clients with the default [`CallPolicy`].
    pub async fn new(region: Option<&str>, endpoint: Option<&str>) -> Self {
        Self::with_policy(region, endpoint, CallPolicy::default()).await
    }

    pub async fn with_policy(
        region: Option<&str>,
        endpoint: Option<&str>,
        policy: CallPolicy,
    ) -> Self {
        Self::with_credentials(region, endpoint, policy, None).await
    }

    /// Clients that sign with `credentials` instead of the standard chain's
    /// (a test playing one instance among several in one process).
    pub async fn with_credentials(
        region: Option<&str>,
        endpoint: Option<&str>,
        policy: CallPolicy,
        credentials: Option<aws_sdk_ec2::config::Credentials>,
    ) -> Self {
        let mut loader = crate::sdk::config_loader()
            .retry_config(policy.retry_config())
            .timeout_config(policy.timeout_config());
        if let Some(c) = credentials {
            loader = loader.credentials_provider(c);
        }
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
            autoscaling: aws_sdk_autoscaling::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
            route53: aws_sdk_route53::Client::new(&conf),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_reaches_the_sdk_config() {
        let p = CallPolicy::default();
        let retry = p.retry_config();
        assert_eq!(retry.max_attempts(), 10);
        assert_eq!(retry.max_backoff(), Duration::from_secs(20));
        let t = p.timeout_config();
        assert_eq!(t.operation_attempt_timeout(), Some(p.attempt_timeout));
        assert_eq!(t.operation_timeout(), Some(p.operation_timeout));
        // Every attempt and backoff fits in the call's own bound.
        assert!(p.attempt_timeout * 2 + p.max_backoff < p.operation_timeout);
    }
}
