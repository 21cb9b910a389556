//! A master's add-ons (node bootstrap RBAC and token, kube-proxy, flannel,
//! CoreDNS), applied once the API server it runs as a static pod answers.
//! Server-side apply under one field manager makes every boot's apply a
//! no-op when nothing changed, and heals what a crash left half-done.

use super::{Context, Master, Report, StepError};
use crate::retry::{self, Backoff};
use serde::Deserialize;
use std::time::Duration;

pub const STEP: &str = "addons";

/// Where the master's API server answers for itself.
pub const LOCAL_READYZ: &str = "https://127.0.0.1:6443/readyz";

/// Written in this boot's run directory once the API server answered, for
/// the approver, which has nothing to do before (see
/// [`super::approver::until_api_answered`]).
pub const API_ANSWERED: &str = "api-answered";

/// The master's own API server, asked in-process whether it is ready. The
/// wait for it asks every few seconds for minutes while the API server
/// starts, and a kubectl run costs seconds of CPU on a slow or emulated
/// instance, CPU the API server's start needs. Anonymous, as the API server
/// allows for its health endpoints; only the cluster's CA is trusted.
#[derive(Debug, Clone)]
pub struct Readyz {
    http: reqwest::Client,
    url: String,
}

impl Readyz {
    /// The API server at `url` (its `/readyz`), trusting `ca_pem` alone.
    pub fn new(url: &str, ca_pem: &[u8]) -> Result<Self, StepError> {
        Ok(Self {
            http: cluster_client(url, ca_pem, None, Duration::from_secs(10))?,
            url: url.to_owned(),
        })
    }

    /// This master's API server, trusting the CA on the tmpfs.
    pub fn local(ctx: &Context) -> Result<Self, StepError> {
        Self::new(LOCAL_READYZ, &read_pki(ctx, "ca.crt")?)
    }

    /// Whether it answers that it is ready.
    pub async fn ready(&self) -> bool {
        self.readiness().await == Readiness::Ready
    }

    /// What it answers: ready, or which of its checks still fail.
    pub async fn readiness(&self) -> Readiness {
        let Ok(answer) = self.http.get(&self.url).send().await else {
            return Readiness::Silent;
        };
        if answer.status().is_success() {
            return Readiness::Ready;
        }
        let status = answer.status().as_u16();
        let checks = failing_checks(&answer.text().await.unwrap_or_default());
        Readiness::Failing { status, checks }
    }
}

/// What the API server answered when asked whether it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// No answer: nothing listens yet, or no TLS handshake finished.
    Silent,
    /// It serves, but answers `status`: these of its checks fail
    /// (post-start hooks, the informers' sync, etcd), as `/readyz` names
    /// them, or none is named (anonymous requests are forbidden until its
    /// RBAC bootstrap made the role that allows them).
    Failing {
        status: u16,
        checks: Vec<String>,
    },
    Ready,
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent => f.write_str("the API server does not answer"),
            Self::Failing { status, checks } if checks.is_empty() => {
                write!(f, "the API server answers, not ready (HTTP {status})")
            }
            Self::Failing { checks, .. } => write!(
                f,
                "the API server answers, not ready: {}",
                checks.join(", ")
            ),
            Self::Ready => f.write_str("the API server is ready"),
        }
    }
}

/// The checks a `/readyz` answer marks as failing (`[-]name failed: …`).
fn failing_checks(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("[-]"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Where the master's API server answers for itself, as its super-admin.
pub const LOCAL_API: &str = "https://127.0.0.1:6443";

/// The master's own API server, spoken to in-process as its super-admin
/// (the kubeconfig on the tmpfs): for the add-ons, and for the approver's
/// lists every few seconds and its decisions, each of which would cost a
/// kubectl run, about two seconds of CPU under emulation, while the
/// control plane and the add-ons start on the same CPUs.
#[derive(Debug, Clone)]
pub struct LocalApi {
    http: reqwest::Client,
    base: String,
}

impl LocalApi {
    /// The API server at `base`, trusting `ca_pem` alone, with the client
    /// certificate and key in `identity_pem`.
    pub fn new(base: &str, ca_pem: &[u8], identity_pem: &[u8]) -> Result<Self, StepError> {
        let timeout = Duration::from_secs(60);
        Ok(Self {
            http: cluster_client(base, ca_pem, Some(identity_pem), timeout)?,
            base: base.to_owned(),
        })
    }

    /// This master's API server, as the super-admin kubeconfig on the tmpfs
    /// names it (read again each time, so a renewed certificate is used).
    pub fn local(ctx: &Context) -> Result<Self, StepError> {
        let conf = String::from_utf8_lossy(&read_pki(ctx, "super-admin.conf")?).into_owned();
        let identity = identity(&conf).ok_or_else(|| StepError::Invalid {
            what: "pki/super-admin.conf".into(),
            message: "no client certificate and key data".into(),
        })?;
        Self::new(LOCAL_API, &read_pki(ctx, "ca.crt")?, &identity)
    }

    /// The body of a successful GET of `path` (`/api/v1/nodes`).
    pub async fn get(&self, path: &str) -> Result<String, StepError> {
        self.send(reqwest::Method::GET, path, None).await
    }

    /// The body of a successful JSON merge patch of the object at `path`.
    pub async fn merge_patch(
        &self,
        path: &str,
        patch: &serde_json::Value,
    ) -> Result<String, StepError> {
        let body = ("application/merge-patch+json", patch.to_string());
        self.send(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// The body of a successful replacement of the object at `path` by
    /// `object` (a subresource such as a request's `/approval`).
    pub async fn put(&self, path: &str, object: &serde_json::Value) -> Result<String, StepError> {
        let body = ("application/json", object.to_string());
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Applies `object` server-side as the add-ons' field manager, taking
    /// over fields another manager set, as `kubectl apply --server-side
    /// --force-conflicts --field-manager=slipway` does; unknown or
    /// duplicate fields are refused.
    pub async fn apply(&self, object: &serde_json::Value) -> Result<String, StepError> {
        let path = object_path(object).map_err(|message| StepError::Invalid {
            what: "an add-on".into(),
            message,
        })?;
        let query =
            format!("{path}?fieldManager={FIELD_MANAGER}&force=true&fieldValidation=Strict");
        let body = ("application/apply-patch+yaml", object.to_string());
        self.send(reqwest::Method::PATCH, &query, Some(body)).await
    }

    /// Deletes the object at `path`; one that is not there is no error.
    /// Returns whether there was one.
    pub async fn delete(&self, path: &str) -> Result<bool, StepError> {
        let answer = self
            .exchange(reqwest::Method::DELETE, path, None, true)
            .await?;
        Ok(answer.is_some())
    }

    /// The body of a successful answer to `method` on `path`.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> Result<String, StepError> {
        let answer = self.exchange(method, path, body, false).await?;
        Ok(answer.unwrap_or_default())
    }

    /// The body of a successful answer to `method` on `path`, or `None`
    /// when the object is not there and `absent_is_fine`.
    async fn exchange(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
        absent_is_fine: bool,
    ) -> Result<Option<String>, StepError> {
        let url = format!("{}{path}", self.base);
        let failed = |message: String| StepError::Invalid {
            what: format!("{method} {url}"),
            message,
        };
        let mut request = self.http.request(method.clone(), &url);
        if let Some((content_type, body)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body);
        }
        let answer = request
            .send()
            .await
            .map_err(|e| failed(crate::error_chain(&e, ": ")))?;
        let status = answer.status();
        let body = answer
            .text()
            .await
            .map_err(|e| failed(crate::error_chain(&e, ": ")))?;
        if status == reqwest::StatusCode::NOT_FOUND && absent_is_fine {
            return Ok(None);
        }
        if !status.is_success() {
            let mut message = format!("{status}: {body}");
            message.truncate(300);
            return Err(failed(message));
        }
        Ok(Some(body))
    }
}

/// An HTTPS client for the API server at `url` that trusts `ca_pem` alone,
/// never goes through a proxy, and presents `identity_pem` (certificate and
/// key) when given one.
pub(crate) fn cluster_client(
    url: &str,
    ca_pem: &[u8],
    identity_pem: Option<&[u8]>,
    timeout: Duration,
) -> Result<reqwest::Client, StepError> {
    let invalid = |e: reqwest::Error| StepError::Invalid {
        what: format!("a client for {url}"),
        message: crate::error_chain(&e, ": "),
    };
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).map_err(invalid)?)
        .no_proxy()
        .timeout(timeout);
    if let Some(pem) = identity_pem {
        builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(invalid)?);
    }
    builder.build().map_err(invalid)
}

/// A file of the master's PKI on the tmpfs.
pub(crate) fn read_pki(ctx: &Context, name: &str) -> Result<Vec<u8>, StepError> {
    let path = ctx.paths.secrets.join("pki").join(name);
    std::fs::read(&path).map_err(|e| StepError::Invalid {
        what: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A kubeconfig's embedded client certificate and key, as one PEM text.
fn identity(kubeconfig: &str) -> Option<Vec<u8>> {
    let data = |key: &str| {
        kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| crate::pki::b64_decode(v.trim()))
    };
    let mut pem = data("client-certificate-data:")?;
    if !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    pem.extend(data("client-key-data:")?);
    Some(pem)
}

/// Every kubectl call's own bound: a busy API server answers slowly, a
/// stuck one must not hold the step past its deadlines.
pub const REQUEST_TIMEOUT: &str = "--request-timeout=60s";

/// The rendered add-on that holds the bootstrap token's Secret.
pub const TOKEN_FILE: &str = "10-bootstrap.yaml";

const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";

/// The master's Node's labels, as a merge patch: its role, and its image's
/// release when the image names one.
fn master_labels(release: Option<&str>) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert(CONTROL_PLANE_LABEL.into(), "".into());
    if let Some(release) = release {
        labels.insert(crate::render::RELEASE_LABEL.into(), release.into());
    }
    serde_json::json!({"metadata": {"labels": labels}})
}

/// How the master waits for its own API server, asked in-process: every
/// second. A question costs next to nothing, and a back-off grown to ten
/// seconds would let the boot wait on it up to as long after the answer
/// came.
fn every_second(deadline: Duration) -> Backoff {
    Backoff::every(Duration::from_secs(1), deadline)
}

/// Objects earlier releases applied that this one must not leave behind:
/// the bindings that had the controller manager approve every
/// bootstrapper's and every kubelet's certificate request (the approver
/// decides those now).
const WITHDRAWN: &[&str] = &[
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/slipway:node-autoapprove-bootstrap",
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/slipway:node-autoapprove-certificate-rotation",
];

/// The field manager that owns what the add-ons set.
const FIELD_MANAGER: &str = "slipway";

/// The kinds the add-ons hold, where the API serves them: API version,
/// kind, resource, and whether an object of it lives in a namespace. The
/// API's discovery would say the same at the cost of requests at every
/// boot; a kind added to the add-ons and missing here fails the unit test
/// that reads them, not a boot.
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "Secret", "secrets", true),
    ("v1", "Service", "services", true),
    ("apps/v1", "DaemonSet", "daemonsets", true),
    ("apps/v1", "Deployment", "deployments", true),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", true),
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "rolebindings",
        true,
    ),
];

/// The API path of `object` (`/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy`);
/// a namespaced object without a namespace is in `default`, as kubectl
/// would put it.
fn object_path(object: &serde_json::Value) -> Result<String, String> {
    fn field(v: &serde_json::Value) -> Option<&str> {
        v.as_str().filter(|s| !s.is_empty())
    }
    let version = field(&object["apiVersion"]).ok_or("no apiVersion")?;
    let kind = field(&object["kind"]).ok_or("no kind")?;
    let name = field(&object["metadata"]["name"])
        .ok_or_else(|| format!("a {kind} without metadata.name"))?;
    let (_, _, resource, namespaced) = KINDS
        .iter()
        .find(|(v, k, _, _)| *v == version && *k == kind)
        .ok_or_else(|| format!("{version} {kind} {name}: not a kind the add-ons step knows"))?;
    let group = match version {
        "v1" => "/api/v1".to_owned(),
        _ => format!("/apis/{version}"),
    };
    Ok(if *namespaced {
        let namespace = field(&object["metadata"]["namespace"]).unwrap_or("default");
        format!("{group}/namespaces/{namespace}/{resource}/{name}")
    } else {
        format!("{group}/{resource}/{name}")
    })
}

/// Every object of the rendered add-ons in `dir`: its `.yaml` files in
/// name order, each file's documents in order (as `kubectl apply -f`
/// takes them), each checked to have a known place in the API before
/// anything is applied.
pub fn read_addons(dir: &std::path::Path) -> Result<Vec<serde_json::Value>, StepError> {
    let invalid = |what: &std::path::Path, message: String| StepError::Invalid {
        what: what.display().to_string(),
        message,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| invalid(dir, e.to_string()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| invalid(&file, e.to_string()))?;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let object = serde_json::Value::deserialize(document)
                .map_err(|e| invalid(&file, e.to_string()))?;
            if object.is_null() {
                continue;
            }
            object_path(&object).map_err(|message| invalid(&file, message))?;
            objects.push(object);
        }
    }
    Ok(objects)
}

/// kubectl as the master's control plane uses it: the super-admin
/// kubeconfig on the tmpfs, every request bounded.
pub(crate) fn kubectl(ctx: &Context) -> impl Fn(&[&str]) -> Result<String, StepError> + '_ {
    kubectl_as(ctx, &ctx.paths.secrets.join("pki/super-admin.conf"))
}

/// kubectl with `kubeconfig`'s identity, every request bounded.
pub(crate) fn kubectl_as<'a>(
    ctx: &'a Context,
    kubeconfig: &std::path::Path,
) -> impl Fn(&[&str]) -> Result<String, StepError> + 'a {
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    move |args: &[&str]| {
        let mut all = vec!["--kubeconfig", kubeconfig.as_str(), REQUEST_TIMEOUT];
        all.extend_from_slice(args);
        ctx.runner.run("kubectl", &all)
    }
}

/// Deletes the bootstrap-token Secrets that never expire, except the
/// current token's: tokens made before tokens expired. (The token cleaner
/// deletes the others when they expire.) Returns the names deleted.
pub fn retire_tokens(ctx: &Context) -> Result<Vec<String>, StepError> {
    let kubectl = kubectl(ctx);
    let token_file = ctx.paths.secrets.join("pki/bootstrap-token");
    let current = std::fs::read_to_string(&token_file).map_err(|e| StepError::Invalid {
        what: token_file.display().to_string(),
        message: e.to_string(),
    })?;
    let keep = format!("bootstrap-token-{}", crate::pki::token_id(current.trim()));
    let out = kubectl(&[
        "--namespace=kube-system",
        "get",
        "secrets",
        "--field-selector=type=bootstrap.kubernetes.io/token",
        "--output=json",
    ])?;
    let list: serde_json::Value = serde_json::from_str(&out).map_err(|e| StepError::Invalid {
        what: "the bootstrap-token Secrets".into(),
        message: e.to_string(),
    })?;
    let mut retired = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let name = item["metadata"]["name"].as_str().unwrap_or_default();
        if name.is_empty() || name == keep || !item["data"]["expiration"].is_null() {
            continue;
        }
        kubectl(&[
            "--namespace=kube-system",
            "delete",
            "secret",
            "--ignore-not-found",
            name,
        ])?;
        retired.push(name.to_owned());
    }
    Ok(retired)
}

/// One change the add-ons step makes: an add-on applied, or an object
/// earlier releases applied deleted.
#[derive(Debug)]
enum Change {
    Apply(serde_json::Value),
    Withdraw(&'static str),
}

impl Change {
    /// A namespace, which what lives in it needs first.
    fn is_namespace(&self) -> bool {
        matches!(self, Self::Apply(object) if object["kind"] == "Namespace")
    }

    async fn make(&self, local: &LocalApi) -> Result<(), StepError> {
        match self {
            Self::Apply(object) => local.apply(object).await.map(drop),
            Self::Withdraw(path) => local.delete(path).await.map(drop),
        }
    }
}

/// How long what the API server refused before it was ready waits to be
/// applied again.
const APPLY_AGAIN: Duration = Duration::from_secs(1);

/// Applies `objects` server-side and deletes [`WITHDRAWN`]: the namespaces
/// first, one by one, then everything else at once, so the API server and
/// etcd take the requests side by side (one after another, 19 objects took
/// 5-20 s of a busy emulated master). Until `ready` is set, what the API
/// server refuses is applied again a second later: before it is ready it
/// refuses what it is not ready for yet (objects in a namespace its
/// controller has not made, a Service's address before its allocator
/// runs). A refusal once it is ready is the step's error.
async fn apply_all(
    local: &LocalApi,
    objects: &[serde_json::Value],
    ready: &std::cell::Cell<bool>,
) -> Result<(), StepError> {
    let mut left: Vec<Change> = objects
        .iter()
        .cloned()
        .map(Change::Apply)
        .chain(WITHDRAWN.iter().copied().map(Change::Withdraw))
        .collect();
    let mut said = false;
    loop {
        let last_try = ready.get();
        let (namespaces, rest): (Vec<_>, Vec<_>) = left.into_iter().partition(Change::is_namespace);
        let mut refused = Vec::new();
        let mut first_error = None;
        for change in namespaces {
            if let Err(e) = change.make(local).await {
                first_error.get_or_insert(e);
                refused.push(change);
            }
        }
        if refused.is_empty() {
            let mut side_by_side = tokio::task::JoinSet::new();
            for change in rest {
                let local = local.clone();
                side_by_side.spawn(async move {
                    let made = change.make(&local).await;
                    (change, made)
                });
            }
            while let Some(joined) = side_by_side.join_next().await {
                let (change, made) = joined.map_err(|e| StepError::Invalid {
                    what: "an add-on's request".into(),
                    message: e.to_string(),
                })?;
                if let Err(e) = made {
                    first_error.get_or_insert(e);
                    refused.push(change);
                }
            }
        } else {
            refused.extend(rest);
        }
        let Some(error) = first_error else {
            return Ok(());
        };
        if last_try {
            return Err(error);
        }
        if !said {
            said = true;
            tracing::info!(
                step = STEP,
                "{} of the add-ons refused before the API server is ready ({error}); \
                 applying them again each second until it is",
                refused.len()
            );
        }
        left = refused;
        tokio::time::sleep(APPLY_AGAIN).await;
    }
}

/// Waits for the API server to answer (up to `api-server`), applies the
/// add-ons and withdraws what earlier releases applied (in-process,
/// through `local`) while it finishes its start, hands the kubelet the
/// static pods held until it is ready, labels the master's Node once its
/// kubelet registered it (up to `node-registers`), retires tokens that
/// never expire, and waits for that Node to be Ready (up to `node-ready`),
/// lifting the cordon its predecessor's departure left.
pub async fn run(ctx: &Master<'_>, api: &Readyz, local: &LocalApi) -> Result<Report, StepError> {
    let dir = ctx.paths.secrets.join("addons");
    let kubectl = kubectl(ctx);
    let objects = read_addons(&dir)?;
    let started = tokio::time::Instant::now();
    // Each change of what it answers is logged: when it began to serve,
    // and which of its start's checks held it back for how long.
    let seen = std::cell::RefCell::new(Readiness::Silent);
    let ask = || async {
        let now = api.readiness().await;
        if now != Readiness::Ready && now != *seen.borrow() {
            tracing::info!("{now}");
        }
        *seen.borrow_mut() = now.clone();
        now
    };
    retry::until(
        "waiting for the API server to answer",
        every_second(ctx.deadlines.api_server),
        || async { Ok::<_, StepError>((ask().await != Readiness::Silent).then_some(())) },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    // Its start's last checks (on a first boot the RBAC bootstrap's
    // hundred-odd writes) take tens of seconds under emulation. The
    // super-admin's requests are served meanwhile, so the add-ons go in
    // beside them: see [`apply_all`].
    let ready = std::cell::Cell::new(false);
    let until_ready = async {
        let left = ctx.deadlines.api_server.saturating_sub(started.elapsed());
        retry::until(
            "waiting for the API server to be ready",
            every_second(left),
            || async { Ok::<_, StepError>((ask().await == Readiness::Ready).then_some(())) },
        )
        .await
        .map_err(|e| StepError::Wait(e.to_string()))?;
        ready.set(true);
        super::mark(ctx, API_ANSWERED)?;
        let released =
            crate::render::release_held_pods(&ctx.paths.etc).map_err(|e| StepError::Invalid {
                what: ctx
                    .paths
                    .etc
                    .join(crate::render::HELD_PODS)
                    .display()
                    .to_string(),
                message: e.to_string(),
            })?;
        let handed = if released.is_empty() {
            String::new()
        } else {
            format!("; the kubelet now runs {}", released.join(", "))
        };
        tracing::info!(step = STEP, "the API server is ready{handed}");
        Ok::<_, StepError>(())
    };
    tracing::info!(
        step = STEP,
        "the API server answers; applying the add-ons while it finishes its start"
    );
    tokio::try_join!(until_ready, apply_all(local, &objects, &ready))?;
    tracing::info!(
        step = STEP,
        "the add-ons applied: {} objects from {}",
        objects.len(),
        dir.display()
    );
    // The master's role label (a kubelet may not set node-role labels on
    // itself), once its kubelet has registered the node; and its release
    // label, which a replacement master's kubelet does not put on the Node
    // its predecessor registered under the same name.
    // Patched in-process, the patch failing until the kubelet registered
    // the Node: asked every second, the wait ends when the Node appears.
    let name = crate::render::master_node_name(ctx.ip);
    let node = format!("node/{name}");
    let path = format!("/api/v1/nodes/{name}");
    let labels = master_labels(crate::render::image_release(&ctx.paths.etc).as_deref());
    retry::until(
        &format!("waiting for {node} to register"),
        every_second(ctx.deadlines.node_registers),
        || async {
            let patched = local.merge_patch(&path, &labels).await;
            Ok::<_, StepError>(patched.ok().map(drop))
        },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    tracing::info!(
        step = STEP,
        "{node} registered and labelled; waiting for it to be Ready"
    );
    // Two kubectl runs, while the kubelet starts the network's pods.
    retire_tokens(ctx)?;
    // In service means able to carry pods: a rolling update that moved on
    // to the nodes before this would find nowhere for their pods to go.
    let ready = super::leave::until_ready(ctx, &kubectl, &name).await?;
    Ok(Report::changed(
        STEP,
        format!(
            "applied {} objects from {}; labelled {node}; {ready}",
            objects.len(),
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::stand_in;
    use crate::steps::{Paths, Runner};
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    /// kubectl as the API server would answer it: the first wait for the
    /// master's Node timing out, the second finding it Ready under the
    /// cordon its predecessor's departure left.
    #[derive(Debug, Clone, Default)]
    struct Kubectl {
        node_asked: Arc<Mutex<usize>>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Runner for Kubectl {
        fn run_with_input(
            &self,
            program: &str,
            args: &[&str],
            _: Option<&Path>,
        ) -> Result<String, StepError> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            if line.contains("wait --for=condition=Ready") {
                let mut asked = self.node_asked.lock().unwrap();
                *asked += 1;
                if *asked == 1 {
                    return Err(StepError::Invalid {
                        what: line,
                        message: "timed out waiting for the condition on nodes/ip-10-0-1-10".into(),
                    });
                }
                return Ok(
                    r#"{"metadata": {"annotations": {"slipway/cordoned-by": "leave"}},
                        "spec": {"unschedulable": true},
                        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}"#
                        .into(),
                );
            }
            if line.contains("get secrets") {
                // The current token, one from before tokens expired, and
                // an expiring one the token cleaner will remove.
                return Ok(r#"{"items": [
                    {"metadata": {"name": "bootstrap-token-abcdef"}, "data": {}},
                    {"metadata": {"name": "bootstrap-token-old000"}, "data": {}},
                    {"metadata": {"name": "bootstrap-token-exp000"}, "data": {"expiration": "MjAyNw=="}}
                ]}"#
                .into());
            }
            Ok("namespace/kube-flannel serverside-applied\nserviceaccount/flannel serverside-applied\n".into())
        }
    }

    /// A stand-in for the API server's health endpoint: HTTPS on loopback
    /// with a certificate for 127.0.0.1 from a CA of its own, answering
    /// each request with the next of `statuses` (the last one from then
    /// on). Returns the probe of it, trusting that CA, and the paths asked.
    async fn stand_in(statuses: &[u16]) -> (Readyz, Arc<Mutex<Vec<String>>>) {
        let (base, ca, asked) = stand_in::api_server(statuses).await;
        let url = format!("{base}/readyz");
        (Readyz::new(&url, ca.as_bytes()).unwrap(), asked)
    }

    /// A client identity as the PKI writes kubeconfigs: its own CA's
    /// certificate for `cn`, and the key.
    fn kubeconfig_for(cn: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = crate::pki::subject(cn, &["system:masters"]);
        let cert = params.self_signed(&key).unwrap();
        crate::pki::kubeconfig(
            "demo",
            LOCAL_API,
            "unused",
            cn,
            &crate::pki::KubeAuth::Cert {
                cert: &cert.pem(),
                key: &key.serialize_pem(),
            },
        )
    }

    #[test]
    fn an_object_is_applied_where_the_api_serves_its_kind() {
        let path = |object: serde_json::Value| object_path(&object);
        assert_eq!(
            path(
                serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                "metadata": {"name": "kube-proxy", "namespace": "kube-system"}})
            ),
            Ok("/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy".into())
        );
        assert_eq!(
            path(
                serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole", "metadata": {"name": "slipway:flannel"}})
            ),
            Ok("/apis/rbac.authorization.k8s.io/v1/clusterroles/slipway:flannel".into())
        );
        assert_eq!(
            path(serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "settings"}})),
            Ok("/api/v1/namespaces/default/configmaps/settings".into())
        );
        let job = path(serde_json::json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "once"}}));
        assert_eq!(
            job,
            Err("batch/v1 Job once: not a kind the add-ons step knows".into())
        );
        let nameless = path(serde_json::json!({"apiVersion": "v1", "kind": "Secret"}));
        assert_eq!(nameless, Err("a Secret without metadata.name".into()));
    }

    #[test]
    fn every_kind_the_add_ons_hold_has_a_place_in_the_api() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/addons");
        let mut seen = 0;
        for file in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            // Templates: only their documents' top-level lines are read.
            for document in text.split("\n---") {
                let top = |key: &str| {
                    document
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .map(|v| v.trim().to_owned())
                };
                let (Some(version), Some(kind)) = (top("apiVersion:"), top("kind:")) else {
                    continue;
                };
                let object = serde_json::json!({"apiVersion": version, "kind": kind,
                    "metadata": {"name": "a", "namespace": "b"}});
                assert!(object_path(&object).is_ok(), "{version} {kind}");
                seen += 1;
            }
        }
        assert!(seen >= 19, "{seen} objects in {}", dir.display());
    }

    #[test]
    fn add_ons_of_an_unknown_kind_are_refused_before_any_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let ok = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n";
        std::fs::write(dir.path().join("10-a.yaml"), ok).unwrap();
        std::fs::write(dir.path().join("README"), "not an add-on").unwrap();
        assert_eq!(read_addons(dir.path()).unwrap().len(), 1);
        let job = "---\napiVersion: batch/v1\nkind: Job\nmetadata:\n  name: once\n";
        std::fs::write(dir.path().join("20-b.yaml"), job).unwrap();
        let err = read_addons(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("20-b.yaml") && err.contains("batch/v1 Job once"),
            "{err}"
        );
    }

    #[test]
    fn the_masters_labels_are_its_role_and_its_release_when_it_has_one() {
        assert_eq!(
            master_labels(Some("0.2.0")),
            serde_json::json!({"metadata": {"labels": {
                "node-role.kubernetes.io/control-plane": "",
                "slipway/release": "0.2.0",
            }}})
        );
        assert_eq!(
            master_labels(None),
            serde_json::json!({"metadata": {"labels": {
                "node-role.kubernetes.io/control-plane": "",
            }}})
        );
    }

    #[test]
    fn the_identity_is_the_kubeconfigs_certificate_then_its_key() {
        let conf = kubeconfig_for("kubernetes-super-admin");
        let pem = String::from_utf8(identity(&conf).unwrap()).unwrap();
        let cert = pem.find("-----BEGIN CERTIFICATE-----").unwrap();
        let key = pem.find("-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(cert < key, "{pem}");
        assert!(reqwest::Identity::from_pem(pem.as_bytes()).is_ok());
        assert!(identity("apiVersion: v1\n").is_none());
    }

    #[tokio::test]
    async fn a_list_is_read_in_process_and_an_error_answer_is_an_error() {
        let (base, ca, asked) = stand_in::api_server(&[200, 403]).await;
        let conf = kubeconfig_for("kubernetes-super-admin");
        let api = LocalApi::new(&base, ca.as_bytes(), &identity(&conf).unwrap()).unwrap();
        assert_eq!(api.get("/api/v1/nodes").await.unwrap(), "ok");
        let err = api.get("/api/v1/nodes").await.unwrap_err().to_string();
        assert!(
            err.contains("/api/v1/nodes") && err.contains("403"),
            "{err}"
        );
        assert_eq!(*asked.lock().unwrap(), ["GET /api/v1/nodes HTTP/1.1"; 2]);
    }

    async fn context(role: &str, runner: Kubectl) -> Context {
        // Never called: no AWS traffic in these tests.
        crate::steps::test_context(role, Box::new(runner), Path::new("/nonexistent")).await
    }

    /// A master's context under a temporary directory: its add-ons (a
    /// namespace and an account in it), its image's release, its bootstrap
    /// token and a static pod held until the API server is ready.
    async fn master_files(kubectl: Kubectl) -> (Context, tempfile::TempDir) {
        let mut ctx = context("master", kubectl).await;
        let dir = tempfile::tempdir().unwrap();
        ctx.paths = Paths::under(dir.path());
        let addons = ctx.paths.secrets.join("addons");
        std::fs::create_dir_all(&addons).unwrap();
        std::fs::write(
            addons.join("30-flannel.yaml"),
            "# comment\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: flannel\n  \
             namespace: kube-flannel\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  \
             name: kube-flannel\n---\n",
        )
        .unwrap();
        std::fs::create_dir_all(&ctx.paths.etc).unwrap();
        std::fs::write(
            ctx.paths.etc.join("os-release"),
            "ID=debian\nIMAGE_ID=slipway\nIMAGE_VERSION=0.2.0\n",
        )
        .unwrap();
        let held = ctx.paths.etc.join(crate::render::HELD_PODS);
        std::fs::create_dir_all(&held).unwrap();
        std::fs::write(held.join("kube-scheduler.yaml"), "kind: Pod\n").unwrap();
        let pki = ctx.paths.secrets.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::write(pki.join("bootstrap-token"), "abcdef.0123456789abcdef").unwrap();
        (ctx, dir)
    }

    /// The stand-in as both the probe of it and its super-admin's client,
    /// answering each request as `answer` says.
    async fn stand_ins_with(
        answer: impl FnMut(&str) -> u16 + Send + 'static,
    ) -> (Readyz, LocalApi, Arc<Mutex<Vec<String>>>) {
        let (base, ca, asked) = stand_in::api_server_with(answer).await;
        let api = Readyz::new(&format!("{base}/readyz"), ca.as_bytes()).unwrap();
        let conf = kubeconfig_for("kubernetes-super-admin");
        let local = LocalApi::new(&base, ca.as_bytes(), &identity(&conf).unwrap()).unwrap();
        (api, local, asked)
    }

    const READYZ: &str = "GET /readyz HTTP/1.1";
    const APPLY: &str = "fieldManager=slipway&force=true&fieldValidation=Strict HTTP/1.1 \
                         application/apply-patch+yaml";
    const NAMESPACE: &str = "PATCH /api/v1/namespaces/kube-flannel?";
    const ACCOUNT: &str = "PATCH /api/v1/namespaces/kube-flannel/serviceaccounts/flannel?";
    const LABEL: &str = "PATCH /api/v1/nodes/ip-10-0-1-10 HTTP/1.1 application/merge-patch+json \
             {\"metadata\":{\"labels\":{\"node-role.kubernetes.io/control-plane\":\"\",\
             \"slipway/release\":\"0.2.0\"}}}";

    fn withdrawn(name: &str) -> String {
        format!("DELETE /apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name} HTTP/1.1")
    }

    #[tokio::test]
    async fn applies_the_add_ons_while_the_api_starts_then_waits_for_its_node() {
        let kubectl = Kubectl::default();
        // Not ready three times, then ready. The account refused once (its
        // namespace not there yet, as a starting API server may say); one
        // withdrawn object gone already, the other deleted; the Node not
        // registered yet, then registered.
        let mut count = std::collections::HashMap::<String, usize>::new();
        let (api, local, asked) = stand_ins_with(move |request| {
            let key = request.split('?').next().unwrap().to_owned();
            let n = count.entry(key).or_default();
            *n += 1;
            match request {
                r if r == READYZ && *n <= 3 => 500,
                r if r.starts_with(ACCOUNT) && *n == 1 => 404,
                r if r == withdrawn("slipway:node-autoapprove-bootstrap") => 404,
                r if r == LABEL && *n == 1 => 404,
                _ => 200,
            }
        })
        .await;
        let (ctx, _dir) = master_files(kubectl.clone()).await;
        let report = run(&Master::of(&ctx).unwrap(), &api, &local).await.unwrap();
        let asked = asked.lock().unwrap().clone();
        let position = |wanted: &dyn Fn(&str) -> bool| asked.iter().position(|r| wanted(r));
        let times = |wanted: &dyn Fn(&str) -> bool| asked.iter().filter(|r| wanted(r)).count();
        let ready_at = asked
            .iter()
            .enumerate()
            .filter(|(_, r)| *r == READYZ)
            .nth(3)
            .map(|(i, _)| i)
            .unwrap();
        // Applied server-side, the namespace before what lives in it, all
        // while the API server was not ready yet; the refused account again.
        let namespace = format!(
            "{NAMESPACE}{APPLY} {{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\
             \"metadata\":{{\"name\":\"kube-flannel\"}}}}"
        );
        let account = format!(
            "{ACCOUNT}{APPLY} {{\"apiVersion\":\"v1\",\"kind\":\"ServiceAccount\",\
             \"metadata\":{{\"name\":\"flannel\",\"namespace\":\"kube-flannel\"}}}}"
        );
        assert_eq!(times(&|r| r == namespace), 1, "{asked:#?}");
        assert_eq!(times(&|r| r == account), 2, "{asked:#?}");
        let first_account = position(&|r| r == account).unwrap();
        assert!(position(&|r| r == namespace).unwrap() < first_account);
        let last_account = asked.iter().rposition(|r| *r == account).unwrap();
        assert!(last_account < ready_at, "{asked:#?}");
        for name in [
            "slipway:node-autoapprove-bootstrap",
            "slipway:node-autoapprove-certificate-rotation",
        ] {
            assert_eq!(times(&|r| r == withdrawn(name)), 1, "{asked:#?}");
        }
        // Readiness asked until ready, then no more; the Node patched
        // after that, until it was there.
        assert_eq!(times(&|r| r == READYZ), 4, "{asked:#?}");
        assert_eq!(asked[0], READYZ);
        assert_eq!(times(&|r| r == LABEL), 2, "{asked:#?}");
        assert!(position(&|r| r == LABEL).unwrap() > ready_at);
        assert_eq!(asked.len(), 4 + 1 + 2 + 2 + 2, "{asked:#?}");
        // Ready: the approver told, the held pod handed to the kubelet.
        assert!(ctx.paths.run.join(API_ANSWERED).exists());
        let started = ctx.paths.etc.join(crate::render::STATIC_PODS);
        assert!(started.join("kube-scheduler.yaml").exists());
        let secrets = ctx.paths.secrets.display().to_string();
        assert!(
            report.detail.starts_with(&format!(
                "applied 2 objects from {secrets}/addons; labelled node/ip-10-0-1-10; \
                 node/ip-10-0-1-10 Ready after "
            )) && report
                .detail
                .ends_with("; uncordoned (its last departure had cordoned it)"),
            "{}",
            report.detail
        );
        let prefix =
            format!("kubectl --kubeconfig {secrets}/pki/super-admin.conf --request-timeout=60s");
        let calls: Vec<String> = kubectl
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.strip_prefix(&prefix).unwrap().trim().to_owned())
            .collect();
        assert_eq!(
            calls,
            [
                "--namespace=kube-system get secrets --field-selector=type=bootstrap.kubernetes.io/token --output=json",
                // Only the token that never expires and is not the current one.
                "--namespace=kube-system delete secret --ignore-not-found bootstrap-token-old000",
                // One watch each, within the deadline (node-ready is
                // 900 s; the first slice timed out).
                "wait --for=condition=Ready --timeout=50s node/ip-10-0-1-10 --output=json",
                "wait --for=condition=Ready --timeout=50s node/ip-10-0-1-10 --output=json",
                r#"patch node/ip-10-0-1-10 --type=merge --patch={"metadata":{"annotations":{"slipway/cordoned-by":null}},"spec":{"unschedulable":false}}"#,
            ]
        );
    }

    #[tokio::test]
    async fn an_add_on_refused_once_the_api_is_ready_fails_the_step() {
        let kubectl = Kubectl::default();
        let (api, local, asked) = stand_ins_with(|request| {
            if request.starts_with(NAMESPACE) {
                422
            } else {
                200
            }
        })
        .await;
        let (ctx, _dir) = master_files(kubectl.clone()).await;
        let err = run(&Master::of(&ctx).unwrap(), &api, &local)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/api/v1/namespaces/kube-flannel") && err.contains("422"),
            "{err}"
        );
        // Ready, so the held pod was handed over; what lives in the
        // refused namespace never asked for, nothing after it done.
        let started = ctx.paths.etc.join(crate::render::STATIC_PODS);
        assert!(started.join("kube-scheduler.yaml").exists());
        let asked = asked.lock().unwrap().clone();
        assert!(!asked.iter().any(|r| r.starts_with(ACCOUNT)), "{asked:#?}");
        assert!(!asked.iter().any(|r| r.starts_with("PATCH /api/v1/nodes")));
        assert!(kubectl.calls.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_api_that_never_answers_ready_fails_at_the_deadline() {
        let kubectl = Kubectl::default();
        let (api, local, asked) = stand_ins_with(|_| 500).await;
        let (mut ctx, _dir) = master_files(kubectl.clone()).await;
        ctx.deadlines.set("api-server=1").unwrap();
        let held = ctx.paths.etc.join(crate::render::HELD_PODS);
        let err = run(&Master::of(&ctx).unwrap(), &api, &local)
            .await
            .unwrap_err();
        // It answered, never ready: the held pods stay held.
        let started = ctx.paths.etc.join(crate::render::STATIC_PODS);
        assert!(!started.join("kube-scheduler.yaml").exists());
        assert!(held.join("kube-scheduler.yaml").exists());
        assert!(
            err.to_string()
                .contains("waiting for the API server to be ready: still not ready"),
            "{err}"
        );
        assert!(!asked.lock().unwrap().is_empty());
        assert!(kubectl.calls.lock().unwrap().is_empty());
        assert!(!ctx.paths.run.join(API_ANSWERED).exists());
    }

    #[tokio::test]
    async fn a_server_whose_certificate_the_cluster_ca_did_not_sign_is_not_ready() {
        let (api, asked) = stand_in(&[200]).await;
        let other_ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let distrusting = Readyz::new(&api.url, other_ca.pem().as_bytes()).unwrap();
        assert_eq!(distrusting.readiness().await, Readiness::Silent);
        assert!(asked.lock().unwrap().is_empty(), "a request was sent");
        assert!(api.ready().await);
    }

    #[tokio::test]
    async fn a_server_not_yet_ready_names_the_checks_that_fail() {
        let (api, _) = stand_in(&[500, 200]).await;
        let failing = api.readiness().await;
        assert_eq!(
            failing,
            Readiness::Failing {
                status: 500,
                checks: vec![
                    "poststarthook/rbac/bootstrap-roles".into(),
                    "informer-sync".into()
                ]
            }
        );
        assert_eq!(
            failing.to_string(),
            "the API server answers, not ready: poststarthook/rbac/bootstrap-roles, informer-sync"
        );
        assert_eq!(api.readiness().await, Readiness::Ready);
        // Forbidden to anonymous requests, it names no check.
        let forbidden = Readiness::Failing {
            status: 403,
            checks: failing_checks("forbidden: User \"system:anonymous\""),
        };
        assert_eq!(
            forbidden.to_string(),
            "the API server answers, not ready (HTTP 403)"
        );
    }
}
