//! A master's add-ons (node bootstrap RBAC and token, kube-proxy, flannel,
//! CoreDNS), applied once the API server it runs as a static pod answers.
//! Server-side apply under one field manager makes every boot's apply a
//! no-op when nothing changed, and heals what a crash left half-done.

use super::{Context, Report, StepError};
use crate::config::Role;
use crate::retry::{self, Backoff};

pub const STEP: &str = "addons";

/// Every kubectl call's own bound: a busy API server answers slowly, a
/// stuck one must not hold the step past its deadlines.
pub const REQUEST_TIMEOUT: &str = "--request-timeout=60s";

const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane=";

/// Objects earlier releases applied that this one must not leave behind:
/// the binding that approved every bootstrapper's certificate request
/// (the approver decides those now).
const WITHDRAWN: &[&str] = &["clusterrolebinding/slipway:node-autoapprove-bootstrap"];

/// Waits for the API server (up to `api-server`), applies the add-ons, and
/// labels the master's Node once its kubelet registered it (up to
/// `node-registers`).
pub async fn run(ctx: &Context) -> Result<Report, StepError> {
    if ctx.config.role != Role::Master {
        return Ok(Report::already(STEP, "nothing to apply on a node"));
    }
    let kubeconfig = ctx.paths.secrets.join("pki/super-admin.conf");
    let kubeconfig = kubeconfig.to_string_lossy();
    let dir = ctx.paths.secrets.join("addons");
    let dir = dir.to_string_lossy();
    let kubectl = |args: &[&str]| {
        let mut all = vec!["--kubeconfig", &kubeconfig, REQUEST_TIMEOUT];
        all.extend_from_slice(args);
        ctx.runner.run("kubectl", &all)
    };
    retry::until(
        "waiting for the API server to be ready",
        Backoff::new(ctx.deadlines.api_server),
        || async { Ok::<_, StepError>(kubectl(&["get", "--raw=/readyz"]).ok()) },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    let out = kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=slipway",
        "-f",
        &dir,
    ])?;
    let objects = out.lines().filter(|l| !l.trim().is_empty()).count();
    for object in WITHDRAWN {
        kubectl(&["delete", "--ignore-not-found", object])?;
    }
    // The master's role label (a kubelet may not set node-role labels on
    // itself), once its kubelet has registered the node.
    let node = format!(
        "node/{}",
        crate::render::master_node_name(ctx.config.master_ip)
    );
    retry::until(
        &format!("waiting for {node} to register"),
        Backoff::new(ctx.deadlines.node_registers),
        || async {
            Ok::<_, StepError>(
                kubectl(&["label", "--overwrite", &node, CONTROL_PLANE_LABEL])
                    .ok()
                    .map(|_| ()),
            )
        },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    Ok(Report::changed(
        STEP,
        format!("applied {objects} objects from {dir}; labelled {node}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StackConfig;
    use crate::steps::{Instance, Paths, Runner};
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    /// kubectl as the API server would answer it: not ready `n` times.
    #[derive(Debug, Clone, Default)]
    struct Kubectl {
        not_ready: Arc<Mutex<usize>>,
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
            let mut left = self.not_ready.lock().unwrap();
            if line.contains("/readyz") && *left > 0 {
                *left -= 1;
                return Err(StepError::Invalid {
                    what: line,
                    message: "connection refused".into(),
                });
            }
            Ok("namespace/kube-flannel serverside-applied\nserviceaccount/flannel serverside-applied\n".into())
        }
    }

    async fn context(role: &str, runner: Kubectl) -> Context {
        let master = if role == "master" {
            "master_eip_allocation = \"eipalloc-0123456789abcdef0\"\nmaster_volume = \"vol-0123456789abcdef0\"\n"
        } else {
            ""
        };
        let text = format!("role = \"{role}\"\ncluster_name = \"demo\"\nsecrets_bucket = \"b-1\"\nmaster_ip = \"10.0.1.10\"\npod_cidr = \"10.244.0.0/16\"\nservice_cidr = \"10.96.0.0/12\"\n{master}");
        Context {
            config: StackConfig::parse(text.as_bytes()).unwrap(),
            instance: Instance {
                id: "i-0123456789abcdef0".into(),
                availability_zone: "us-east-1a".into(),
            },
            // Never called: no AWS traffic in these tests.
            aws: crate::aws::Clients::new(Some("us-east-1"), Some("http://127.0.0.1:9")).await,
            paths: Paths::under(std::path::Path::new("/nonexistent")),
            runner: Box::new(runner),
            deadlines: crate::steps::Deadlines::default(),
        }
    }

    #[tokio::test]
    async fn waits_for_the_api_then_applies_server_side() {
        let kubectl = Kubectl::default();
        *kubectl.not_ready.lock().unwrap() = 2;
        let ctx = context("master", kubectl.clone()).await;
        let report = run(&ctx).await.unwrap();
        assert_eq!(
            report.detail,
            "applied 2 objects from /nonexistent/srv/kubernetes/addons; labelled node/ip-10-0-1-10"
        );
        let calls = kubectl.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 6, "{calls:?}");
        assert!(calls[..3].iter().all(|c| c.ends_with("get --raw=/readyz")));
        assert_eq!(
            calls[3],
            "kubectl --kubeconfig /nonexistent/srv/kubernetes/pki/super-admin.conf --request-timeout=60s apply --server-side --force-conflicts --field-manager=slipway -f /nonexistent/srv/kubernetes/addons"
        );
        assert_eq!(
            calls[4],
            "kubectl --kubeconfig /nonexistent/srv/kubernetes/pki/super-admin.conf --request-timeout=60s delete --ignore-not-found clusterrolebinding/slipway:node-autoapprove-bootstrap"
        );
        assert_eq!(
            calls[5],
            "kubectl --kubeconfig /nonexistent/srv/kubernetes/pki/super-admin.conf --request-timeout=60s label --overwrite node/ip-10-0-1-10 node-role.kubernetes.io/control-plane="
        );
    }

    #[tokio::test]
    async fn an_api_that_never_answers_fails_at_the_deadline() {
        let kubectl = Kubectl::default();
        *kubectl.not_ready.lock().unwrap() = usize::MAX;
        let mut ctx = context("master", kubectl.clone()).await;
        ctx.deadlines.set("api-server=1").unwrap();
        let err = run(&ctx).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("waiting for the API server to be ready: still not ready"),
            "{err}"
        );
        assert!(!kubectl
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.contains("apply")));
    }

    #[tokio::test]
    async fn a_node_applies_nothing() {
        let kubectl = Kubectl::default();
        let ctx = context("node", kubectl.clone()).await;
        assert!(!run(&ctx).await.unwrap().changed);
        assert!(kubectl.calls.lock().unwrap().is_empty());
    }
}
