//! The instance metadata service, IMDSv2 only: a session token first, then
//! reads that carry it. Early in boot the service (or the route to it) may
//! not be up yet, so every read retries connection failures and 5xx answers
//! with backoff until a deadline; a 404 is an answer ("not there"), not a
//! reason to wait.

use crate::retry::{self, Backoff};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Where EC2 serves it; `AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides (tests).
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
const TOKEN_TTL_SECONDS: &str = "21600";

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("building the metadata client: {0}")]
    Client(reqwest::Error),
    #[error("the instance metadata service at {endpoint}: {source}")]
    Wait {
        endpoint: String,
        #[source]
        source: retry::WaitError<Transient>,
    },
    #[error("the instance metadata service has no {path} for this instance")]
    Missing { path: String },
    #[error("the instance metadata service answered {path} with {status}")]
    Refused { path: String, status: u16 },
}

/// Why one attempt failed in a way worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(String);

#[derive(Debug, Clone)]
pub struct Imds {
    endpoint: String,
    http: reqwest::Client,
    deadline: Duration,
}

enum Answer {
    Body(Vec<u8>),
    NotFound,
    Refused(u16),
    /// The token expired or was rejected: fetch a new one.
    Unauthorized,
}

impl Imds {
    /// A client for `endpoint` (no trailing slash) that keeps retrying for
    /// up to `deadline` while the service does not answer.
    pub fn new(endpoint: &str, deadline: Duration) -> Result<Self, ImdsError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .map_err(ImdsError::Client)?;
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            http,
            deadline,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn attempt(
        &self,
        path: &str,
        token: &Mutex<Option<String>>,
    ) -> Result<Answer, Transient> {
        let cached = token.lock().ok().and_then(|t| t.clone());
        let t = match cached {
            Some(t) => t,
            None => {
                let r = self
                    .http
                    .put(format!("{}/latest/api/token", self.endpoint))
                    .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
                    .send()
                    .await
                    .map_err(|e| Transient(format!("requesting a session token: {e}")))?;
                let status = r.status();
                if !status.is_success() {
                    return Err(Transient(format!(
                        "session token request answered {status}"
                    )));
                }
                let t = r
                    .text()
                    .await
                    .map_err(|e| Transient(format!("reading the session token: {e}")))?;
                if let Ok(mut slot) = token.lock() {
                    *slot = Some(t.clone());
                }
                t
            }
        };
        let r = self
            .http
            .get(format!("{}{path}", self.endpoint))
            .header("X-aws-ec2-metadata-token", t)
            .send()
            .await
            .map_err(|e| Transient(format!("reading {path}: {e}")))?;
        let status = r.status();
        if status.is_server_error() {
            return Err(Transient(format!("{path} answered {status}")));
        }
        Ok(match status.as_u16() {
            200 => Answer::Body(
                r.bytes()
                    .await
                    .map_err(|e| Transient(format!("reading {path}: {e}")))?
                    .to_vec(),
            ),
            401 => Answer::Unauthorized,
            404 => Answer::NotFound,
            other => Answer::Refused(other),
        })
    }

    /// Reads `path` (e.g. `/latest/user-data`), waiting for the service.
    pub async fn get(&self, path: &str) -> Result<Vec<u8>, ImdsError> {
        let token = Mutex::new(None);
        let what = format!("reading {path}");
        let announced = AtomicBool::new(false);
        // The service is on the link: polling it every second costs nothing,
        // and the boot does not wait for the network to be declared online
        // first, so the first answer comes within a second of DHCP's.
        let backoff = Backoff {
            max: Duration::from_secs(1),
            ..Backoff::new(self.deadline)
        };
        let answer = retry::until(&what, backoff, || {
            let (token, announced) = (&token, &announced);
            async move {
                match self.attempt(path, token).await {
                    Ok(Answer::Unauthorized) => {
                        if let Ok(mut slot) = token.lock() {
                            *slot = None;
                        }
                        Ok(None)
                    }
                    Ok(a) => Ok(Some(a)),
                    Err(e) => {
                        if !announced.swap(true, Ordering::Relaxed) {
                            tracing::info!("waiting for the instance metadata service: {e}");
                        }
                        Ok::<_, Transient>(None)
                    }
                }
            }
        })
        .await
        .map_err(|source| ImdsError::Wait {
            endpoint: self.endpoint.clone(),
            source,
        })?;
        match answer {
            Answer::Body(b) => Ok(b),
            Answer::NotFound => Err(ImdsError::Missing {
                path: path.to_owned(),
            }),
            Answer::Refused(status) => Err(ImdsError::Refused {
                path: path.to_owned(),
                status,
            }),
            Answer::Unauthorized => Err(ImdsError::Refused {
                path: path.to_owned(),
                status: 401,
            }),
        }
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ImdsError> {
        let bytes = self.get(path).await?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    }

    /// This instance's ID and availability zone.
    pub async fn instance(&self) -> Result<crate::steps::Instance, ImdsError> {
        Ok(crate::steps::Instance {
            id: self.get_text("/latest/meta-data/instance-id").await?,
            availability_zone: self
                .get_text("/latest/meta-data/placement/availability-zone")
                .await?,
        })
    }

    /// The launch template's user data: the stack config.
    pub async fn user_data(&self) -> Result<Vec<u8>, ImdsError> {
        self.get("/latest/user-data").await
    }
}
