//! A node's kubelet starts once the cluster admits the node: the API server
//! is ready and answers the node's bootstrap token with the rights it is
//! bound to (those of `system:node-bootstrapper`, which the master's
//! add-ons grant).
//!
//! A kubelet started sooner is refused (the API server is not up, the token
//! is not known yet) and its client-go informers back off; in the cluster
//! test a node that got its certificate saw its own Node 28 s after it had
//! registered. Meanwhile it polls its Node ten times a second and logs each
//! miss, CPU a master starting beside it on a small machine could use.
//! Ready, not only answering: the master applies its add-ons (the token
//! among them) from its API server's first answer, tens of seconds before
//! an emulated master's RBAC bootstrap ends, and a kubelet admitted then
//! would put its lists and watches on a server still starting, while its
//! certificate request would wait anyway for the master's approver, which
//! starts once the API server is ready.
//!
//! The wait never fails the boot: past its deadline (the master down, a
//! partition) the kubelet starts anyway and keeps asking on its own, as it
//! did before this step existed.

use super::{Context, Report, StepError};
use crate::retry::{self, Backoff};
use std::cell::RefCell;
use std::time::{Duration, Instant};

pub const STEP: &str = "admission";

/// What a node's bootstrap token may do once the add-ons are applied:
/// list certificate requests. One item, so the answer stays small.
const PROBE: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests?limit=1";

/// Whether the API server has finished its start; any authenticated user
/// may ask once its RBAC bootstrap made the role that allows it.
const READY: &str = "/readyz";

/// How often the API server is asked: an in-process request costs next to
/// nothing, and the kubelet starts within this of the token's admission.
const EVERY: Duration = Duration::from_secs(2);

/// What the API server answered the bootstrap token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing answered: the API server (or its name) is not there yet.
    Silent(String),
    /// 401: the token is not known yet (the add-ons make its Secret).
    Unknown,
    /// Its `/readyz` answers this status: its start has not ended.
    Starting(u16),
    /// 403: known, not yet bound to the node bootstrapper's rights.
    Forbidden,
    /// Any other status.
    Other(u16),
    Admitted,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent(why) => write!(f, "the API server does not answer ({why})"),
            Self::Unknown => f.write_str("the API server does not know the bootstrap token yet"),
            Self::Starting(status) => write!(
                f,
                "the API server is still starting (its /readyz answers HTTP {status})"
            ),
            Self::Forbidden => f.write_str("the bootstrap token may not ask for a certificate yet"),
            Self::Other(status) => write!(f, "the API server answers HTTP {status}"),
            Self::Admitted => f.write_str("the API server admits the bootstrap token"),
        }
    }
}

/// The API server a node's bootstrap kubeconfig names, asked with its token.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Bootstrap {
    /// From the bootstrap kubeconfig and CA the node bundle wrote.
    pub fn from_bundle(ctx: &Context) -> Result<Self, StepError> {
        let conf = "bootstrap-kubelet.conf";
        let text = String::from_utf8_lossy(&super::addons::read_pki(ctx, conf)?).into_owned();
        let (server, token) = crate::pki::kubeconfig_token(conf, &text)?;
        Self::new(&server, &super::addons::read_pki(ctx, "ca.crt")?, &token)
    }

    /// The API server at `server`, trusting `ca_pem` alone.
    pub fn new(server: &str, ca_pem: &[u8], token: &str) -> Result<Self, StepError> {
        Ok(Self {
            http: super::addons::cluster_client(server, ca_pem, None, Duration::from_secs(10))?,
            server: server.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    /// What the API server answers the token now: whether it is ready,
    /// then whether the token may ask for a certificate.
    pub async fn ask(&self) -> Answer {
        match self.status(READY).await {
            Ok(200) => {}
            Ok(401) => return Answer::Unknown,
            Ok(status) => return Answer::Starting(status),
            Err(silent) => return silent,
        }
        match self.status(PROBE).await {
            Ok(200) => Answer::Admitted,
            Ok(401) => Answer::Unknown,
            Ok(403) => Answer::Forbidden,
            Ok(other) => Answer::Other(other),
            Err(silent) => silent,
        }
    }

    /// The status the API server answers a GET of `path` with the token,
    /// or the silence when nothing answered.
    async fn status(&self, path: &str) -> Result<u16, Answer> {
        self.http
            .get(format!("{}{path}", self.server))
            .bearer_auth(&self.token)
            .send()
            .await
            .map(|a| a.status().as_u16())
            .map_err(|e| Answer::Silent(crate::error_chain(&e, ": ")))
    }
}

/// Waits up to `deadline` for the API server to admit the node's token,
/// logging each change of what it answers. Never an error: past the
/// deadline the report says so and the boot goes on.
pub async fn wait(api: &Bootstrap, deadline: Duration) -> Report {
    let start = Instant::now();
    // The last answer, for the log and the report (`until` takes an
    // `FnMut` whose future cannot borrow the closure's state mutably).
    let last: RefCell<Option<Answer>> = RefCell::new(None);
    let what = format!("waiting for {} to admit this node", api.server);
    let admitted = retry::until(&what, Backoff::every(EVERY, deadline), || async {
        let answer = api.ask().await;
        if answer == Answer::Admitted {
            return Ok::<_, std::convert::Infallible>(Some(()));
        }
        // A changed reason is news; the same one again is not.
        let news = match (&*last.borrow(), &answer) {
            (Some(Answer::Silent(_)), Answer::Silent(_)) => false,
            (Some(before), now) => before != now,
            (None, _) => true,
        };
        if news {
            tracing::info!(step = STEP, "{answer}");
        }
        last.replace(Some(answer));
        Ok(None)
    })
    .await;
    let waited = start.elapsed().as_secs();
    match admitted {
        Ok(()) => Report::changed(
            STEP,
            format!("{} admits the bootstrap token after {waited}s", api.server),
        ),
        Err(_) => {
            let reason = last
                .into_inner()
                .map_or_else(String::new, |a| format!(": {a}"));
            tracing::warn!(
                step = STEP,
                "not admitted after {waited}s{reason}; the kubelet starts and asks on its own"
            );
            Report::already(
                STEP,
                format!("not admitted after {waited}s; the kubelet asks on its own"),
            )
        }
    }
}

/// A node's admission: the wait, unless this boot's kubelet already has
/// its own credentials (the boot ran again after the kubelet started).
pub async fn run(ctx: &Context) -> Result<Report, StepError> {
    if ctx.paths.secrets.join("kubelet.conf").exists() {
        return Ok(Report::already(STEP, "the kubelet has its own credentials"));
    }
    let api = Bootstrap::from_bundle(ctx)?;
    Ok(wait(&api, ctx.deadlines.admission).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::stand_in;

    async fn stand_in(
        statuses: &[u16],
    ) -> (Bootstrap, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let (base, ca, asked) = stand_in::api_server(statuses).await;
        (
            Bootstrap::new(&base, ca.as_bytes(), "abcdef.0123456789abcdef").unwrap(),
            asked,
        )
    }

    #[tokio::test]
    async fn waits_through_a_starting_api_an_unknown_token_and_no_rights() {
        // Asked in turn: not ready; ready, the token unknown; ready, the
        // token without its rights yet; ready and admitted.
        let (api, asked) = stand_in(&[500, 200, 401, 200, 403, 200, 200]).await;
        let report = wait(&api, Duration::from_secs(30)).await;
        assert!(report.changed, "{report:?}");
        assert!(
            report.detail.contains("admits the bootstrap token"),
            "{report:?}"
        );
        let line = |path: &str| {
            format!("GET {path} HTTP/1.1 authorization: Bearer abcdef.0123456789abcdef")
        };
        let (ready, probe) = (line(READY), line(PROBE));
        assert_eq!(
            *asked.lock().unwrap(),
            [&ready, &ready, &probe, &ready, &probe, &ready, &probe].map(String::as_str)
        );
    }

    #[tokio::test]
    async fn past_its_deadline_the_boot_goes_on() {
        let (api, asked) = stand_in(&[401]).await;
        let report = wait(&api, Duration::from_secs(3)).await;
        assert!(!report.changed, "{report:?}");
        assert!(
            report.detail.starts_with("not admitted after"),
            "{report:?}"
        );
        assert!(asked.lock().unwrap().len() >= 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_silence_not_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let (_, ca, _) = stand_in::api_server(&[200]).await;
        let api = Bootstrap::new(&format!("https://127.0.0.1:{port}"), ca.as_bytes(), "t").unwrap();
        assert!(matches!(api.ask().await, Answer::Silent(_)));
    }

    #[test]
    fn answers_read_as_what_the_node_waits_for() {
        assert_eq!(
            Answer::Unknown.to_string(),
            "the API server does not know the bootstrap token yet"
        );
        assert_eq!(
            Answer::Forbidden.to_string(),
            "the bootstrap token may not ask for a certificate yet"
        );
        assert_eq!(
            Answer::Starting(403).to_string(),
            "the API server is still starting (its /readyz answers HTTP 403)"
        );
    }
}
