//! A member's arrival and departure as a release update sees them.
//!
//! Arrival: a new node tells its stack it is in service only once the API
//! server reports it Ready (`slipway-init ready`), so a rolling update
//! moves to the next batch only when the last one carries pods again. A
//! master signals after its add-ons, once its own Node is Ready too (see
//! `addons`). Either lifts the cordon its own last departure left on its
//! Node (a master replaced under the same name, an instance stopped and
//! started), and no other.
//!
//! Departure: `slipway-leave.service` runs `slipway-init leave` as the
//! instance shuts down, for whatever reason it does (a rolling update, a
//! scale-in, a replacement, a stop), while kubelet, containerd and the
//! network still run. Every member cordons its Node and evicts its pods
//! through the eviction API, so PodDisruptionBudgets hold, until none is
//! left or the `drain` deadline passes. A master drains too: pods left on
//! it would keep the Ready status its last kubelet wrote while nothing
//! runs them, until its replacement's kubelet starts them again, and a
//! node's drain in the meantime would count them as available. Then a
//! master stops kubelet (so no static pod is restarted behind it), then
//! its control plane top-down and etcd last, each given time to exit, so
//! etcd's data is consistent on the volume when the volume detaches; a
//! drain that fails does not hold that back. The kubelet's own
//! credentials suffice: the API server's NodeRestriction lets a kubelet
//! evict only pods bound to its Node and change only that Node.

use super::renewal::{crictl, running};
use super::{Context, Master, Report, StepError};
use crate::config::Member;
use crate::retry::{self, Backoff};
use std::time::Duration;
use tokio::time::Instant;

pub const READY_STEP: &str = "ready";
pub const LEAVE_STEP: &str = "leave";
pub const REJOIN_STEP: &str = "rejoin";

/// Written on the tmpfs once this boot saw the member's Node Ready: from
/// then on a missing Node means the API lost it (see [`rejoin`]), not
/// that the kubelet has yet to register.
pub const IN_SERVICE: &str = "in-service";

/// The control plane's containers in the order a leaving master stops
/// them: the API's clients first, etcd last.
const STOP_ORDER: &[&str] = &[
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
];

/// How long each container is given to exit before it is killed.
const STOP_GRACE: &str = "30";

/// kubectl as this instance's kubelet: its own kubeconfig (a node's
/// client certificate from TLS bootstrap), every request bounded.
fn kubelet_kubectl(ctx: &Context) -> impl Fn(&[&str]) -> Result<String, StepError> + '_ {
    super::addons::kubectl_as(ctx, &super::configure::kubelet_conf(ctx))
}

/// The annotation a leaving member's cordon carries, so the member's next
/// boot lifts that cordon and no other (an operator's stays).
pub const CORDON_ANNOTATION: &str = "slipway/cordoned-by";
const CORDONED_BY_LEAVE: &str = "leave";

/// This member's Node name: the master's is fixed by its zone's address
/// (a replacement in the same zone registers under its predecessor's), a
/// node's is its instance ID.
pub fn own_node(ctx: &Context) -> Result<String, StepError> {
    Ok(match Master::if_master(ctx)? {
        Some(master) => crate::render::master_node_name(master.ip),
        None => ctx.instance.id.clone(),
    })
}

/// The longest one `kubectl wait` watches for a Node: shorter than the
/// request timeout every kubectl call carries.
const WAIT_SLICE: Duration = Duration::from_secs(50);

/// Waits (up to `node-ready`) until `node` is Ready in the API, then lifts
/// the cordon its last departure left on it, if any: a master replaced
/// under the same name, or an instance stopped and started again. Returns
/// what it did, for the step's report.
pub async fn until_ready(
    ctx: &Context,
    kubectl: &impl Fn(&[&str]) -> Result<String, StepError>,
    node: &str,
) -> Result<String, StepError> {
    let object = format!("node/{node}");
    let started = Instant::now();
    let deadline = ctx.deadlines.node_ready;
    let seen = retry::until(
        &format!("waiting for {object} to be Ready"),
        Backoff::new(deadline),
        || async {
            // One watch rather than a poll: a kubectl run costs seconds of
            // CPU on an emulated or small instance, and the wait can last
            // minutes. A slice ends before kubectl's request timeout and
            // within the deadline; a Node not registered yet fails at once
            // and is asked for again after the back-off.
            let slice = deadline
                .saturating_sub(started.elapsed())
                .clamp(Duration::from_secs(1), WAIT_SLICE);
            let timeout = format!("--timeout={}s", slice.as_secs());
            let wait = ["wait", "--for=condition=Ready", &timeout, &object];
            let found = kubectl(&[&wait[..], &["--output=json"]].concat())
                .ok()
                .and_then(|out| serde_json::from_str::<serde_json::Value>(&out).ok())
                .filter(is_ready);
            Ok::<_, StepError>(found)
        },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    super::mark(ctx, IN_SERVICE)?;
    let mut detail = format!("{object} Ready after {}s", started.elapsed().as_secs());
    if seen["metadata"]["annotations"][CORDON_ANNOTATION] == CORDONED_BY_LEAVE {
        let patch = serde_json::json!({
            "metadata": {"annotations": {CORDON_ANNOTATION: null}},
            "spec": {"unschedulable": false},
        });
        kubectl(&[
            "patch",
            &object,
            "--type=merge",
            &format!("--patch={patch}"),
        ])?;
        detail.push_str("; uncordoned (its last departure had cordoned it)");
    }
    Ok(detail)
}

/// Whether kubectl failed because the object does not exist (its
/// `Error from server (NotFound)`), rather than for any other reason.
fn is_not_found(e: &StepError) -> bool {
    matches!(e, StepError::Invalid { message, .. } if message.contains("(NotFound)"))
}

/// Puts this member's Node back when the API lost it. A kubelet registers
/// its Node once, at its start, and never again: when etcd is restored
/// from a backup taken before the Node existed (a node that joined
/// since), the kubelet goes on posting status for a Node the API no
/// longer has, and the member is out of the cluster for good. So a timer
/// asks, as the kubelet, whether the Node is there; once this boot has
/// seen it Ready (earlier, its absence is the kubelet still registering),
/// a `NotFound` restarts kubelet, which registers it again, and waits (up
/// to `node-registers`) until it is back. An API server that does not
/// answer is asked again at the next run.
pub async fn rejoin(ctx: &Context) -> Result<Report, StepError> {
    if !ctx.paths.run.join(IN_SERVICE).exists() {
        return Ok(Report::already(
            REJOIN_STEP,
            "not yet in service this boot: nothing to check",
        ));
    }
    let kubectl = kubelet_kubectl(ctx);
    let object = format!("node/{}", own_node(ctx)?);
    let get = || kubectl(&["get", &object, "--output=name"]);
    match get() {
        Ok(_) => Ok(Report::already(
            REJOIN_STEP,
            format!("{object} is in the API"),
        )),
        Err(e) if is_not_found(&e) => {
            tracing::warn!(
                step = REJOIN_STEP,
                "{object} is gone from the API (etcd restored from a backup older than it?): \
                 restarting kubelet to register it again"
            );
            let started = Instant::now();
            ctx.runner
                .run("systemctl", &["restart", "kubelet.service"])?;
            retry::until(
                &format!("{object} to be registered again"),
                Backoff::new(ctx.deadlines.node_registers),
                || async { Ok::<_, StepError>(get().ok()) },
            )
            .await
            .map_err(|e| StepError::Wait(e.to_string()))?;
            let detail = format!(
                "{object} was gone from the API: kubelet restarted, registered again after {}s",
                started.elapsed().as_secs()
            );
            tracing::warn!(step = REJOIN_STEP, "{detail}");
            Ok(Report::changed(REJOIN_STEP, detail))
        }
        Err(e) => Ok(Report::already(
            REJOIN_STEP,
            format!("could not ask for {object} ({e}): asked again at the next run"),
        )),
    }
}

/// Whether a Node object's Ready condition is `True`.
fn is_ready(node: &serde_json::Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Waits (up to `node-ready`) until this node is Ready in the API. On a
/// master there is nothing to wait for here (its add-ons step waits).
pub async fn ready(ctx: &Context) -> Result<Report, StepError> {
    if let Member::Master(_) = ctx.config.member {
        return Ok(Report::already(
            READY_STEP,
            "a master is in service once its add-ons are applied and it is Ready",
        ));
    }
    let kubectl = kubelet_kubectl(ctx);
    let detail = until_ready(ctx, &kubectl, &own_node(ctx)?).await?;
    Ok(Report::changed(READY_STEP, detail))
}

/// A pod the drain has to move: not a DaemonSet's (it would come back),
/// not a static pod's mirror, not finished.
fn must_move(pod: &serde_json::Value) -> bool {
    let owned_by_daemon_set = pod["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["kind"] == "DaemonSet");
    let mirror = !pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null();
    let finished = matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    !(owned_by_daemon_set || mirror || finished)
}

/// `namespace/name` of each pod on `node` the drain has to move, and
/// whether each is already on its way out.
fn pods_to_move(
    kubectl: &impl Fn(&[&str]) -> Result<String, StepError>,
    node: &str,
) -> Result<Vec<(String, String, bool)>, StepError> {
    let selector = format!("--field-selector=spec.nodeName={node}");
    let out = kubectl(&[
        "get",
        "pods",
        "--all-namespaces",
        &selector,
        "--output=json",
    ])?;
    let list: serde_json::Value = serde_json::from_str(&out).map_err(|e| StepError::Invalid {
        what: format!("the pods on {node}"),
        message: e.to_string(),
    })?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| must_move(p))
        .map(|p| {
            (
                p["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                p["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                !p["metadata"]["deletionTimestamp"].is_null(),
            )
        })
        .collect())
}

/// Cordons this member's Node and evicts its pods, respecting their
/// disruption budgets, until none is left or the `drain` deadline passes.
/// Returns what it did.
async fn drain(ctx: &Context) -> Result<String, StepError> {
    let kubectl = kubelet_kubectl(ctx);
    let node = own_node(ctx)?;
    let node = node.as_str();
    let cordon = serde_json::json!({
        "metadata": {"annotations": {CORDON_ANNOTATION: CORDONED_BY_LEAVE}},
        "spec": {"unschedulable": true},
    });
    let cordon = format!("--patch={cordon}");
    std::fs::create_dir_all(&ctx.paths.run).map_err(|e| StepError::Invalid {
        what: ctx.paths.run.display().to_string(),
        message: e.to_string(),
    })?;
    let started = Instant::now();
    let mut cordoned = false;
    let mut evicted = 0usize;
    // When the drain last said which pods it waits for.
    let mut said: Option<Instant> = None;
    loop {
        // A busy or briefly unreachable API server is asked again, until
        // the deadline.
        let listed = if cordoned {
            pods_to_move(&kubectl, node)
        } else {
            kubectl(&["patch", &format!("node/{node}"), "--type=merge", &cordon])
                .map(|_| {
                    cordoned = true;
                    tracing::info!(step = LEAVE_STEP, "cordoned node/{node}");
                })
                .and_then(|()| pods_to_move(&kubectl, node))
        };
        let left = match listed {
            Ok(left) => left,
            Err(e) if started.elapsed() < ctx.deadlines.drain => {
                tracing::warn!(step = LEAVE_STEP, "{e}; asking again");
                tokio::time::sleep(Duration::from_secs(3)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if left.is_empty() {
            return Ok(format!(
                "node/{node} drained: {evicted} evictions in {}s",
                started.elapsed().as_secs()
            ));
        }
        let names: Vec<String> = left.iter().map(|(ns, n, _)| format!("{ns}/{n}")).collect();
        if started.elapsed() >= ctx.deadlines.drain {
            return Err(StepError::Wait(format!(
                "node/{node}: {} pods still here at the `drain` deadline ({}s): {}",
                left.len(),
                ctx.deadlines.drain.as_secs(),
                names.join(", ")
            )));
        }
        if said.map_or(true, |at| at.elapsed() >= retry::SAY_EVERY) {
            said = Some(Instant::now());
            tracing::info!(
                step = LEAVE_STEP,
                "{} pods still on node/{node} after {}s: {}",
                left.len(),
                started.elapsed().as_secs(),
                names.join(", ")
            );
        }
        for (namespace, name, leaving) in &left {
            if *leaving {
                continue;
            }
            match evict(ctx, &kubectl, namespace, name) {
                Ok(()) => {
                    evicted += 1;
                    tracing::info!(step = LEAVE_STEP, "evicted {namespace}/{name}");
                }
                // 429: a disruption budget allows no eviction now; the
                // pod's replacement elsewhere has to become ready first.
                Err(e) => {
                    tracing::info!(step = LEAVE_STEP, "{namespace}/{name} stays for now: {e}")
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

/// Asks the API server to evict one pod (the eviction API, which checks
/// the pod's disruption budgets).
fn evict(
    ctx: &Context,
    kubectl: &impl Fn(&[&str]) -> Result<String, StepError>,
    namespace: &str,
    name: &str,
) -> Result<(), StepError> {
    let body = serde_json::json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
    });
    let file = ctx.paths.run.join("eviction.json");
    std::fs::write(&file, body.to_string()).map_err(|e| StepError::Invalid {
        what: file.display().to_string(),
        message: e.to_string(),
    })?;
    let path = format!("--raw=/api/v1/namespaces/{namespace}/pods/{name}/eviction");
    let file = file.to_string_lossy();
    kubectl(&["create", &path, "--filename", &file]).map(|_| ())
}

/// Stops kubelet, then the control plane's containers one by one, etcd
/// last, each given `STOP_GRACE` seconds to exit. Returns what it did.
async fn stop_control_plane(ctx: &Context) -> Result<String, StepError> {
    // Signalled, not stopped through a job: kubelet's own stop job waits
    // for this unit (it is ordered after kubelet), so waiting for it here
    // would wait for ever. With a stop pending, systemd does not restart it.
    ctx.runner.run("systemctl", &["kill", "kubelet.service"])?;
    retry::until(
        "waiting for kubelet to exit",
        Backoff::new(Duration::from_secs(20)),
        || async {
            let pid = ctx.runner.run(
                "systemctl",
                &["show", "--property=MainPID", "--value", "kubelet.service"],
            )?;
            Ok::<_, StepError>((pid.trim() == "0").then_some(()))
        },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    tracing::info!(step = LEAVE_STEP, "kubelet stopped");
    let mut stopped = Vec::new();
    for name in STOP_ORDER {
        for id in running(ctx, name)? {
            crictl(ctx, &["stop", "--timeout", STOP_GRACE, &id])?;
            tracing::info!(step = LEAVE_STEP, "{name} stopped");
            stopped.push(*name);
        }
    }
    ctx.runner.run("sync", &[])?;
    Ok(if stopped.is_empty() {
        "kubelet stopped; no control-plane container was running".to_owned()
    } else {
        format!("kubelet stopped, then {} in turn", stopped.join(", "))
    })
}

/// Leaves the cluster cleanly (see the module's docs).
pub async fn leave(ctx: &Context) -> Result<Report, StepError> {
    let detail = match Master::if_master(ctx)? {
        None => drain(ctx).await?,
        Some(master) => {
            // A drain that cannot finish does not keep etcd from a clean
            // stop: the master goes either way, and its volume with it.
            let drained = drain(ctx).await.unwrap_or_else(|e| {
                tracing::warn!(step = LEAVE_STEP, "{e}; stopping all the same");
                format!("not drained ({e})")
            });
            let stopped = stop_control_plane(ctx).await?;
            // The API's record goes only with the stack; failing to look
            // does not hold the departure back.
            let record = super::api_record::leave(&master).await.unwrap_or_else(|e| {
                tracing::warn!(step = LEAVE_STEP, "{e}");
                format!("the API's record left as it is ({e})")
            });
            format!("{drained}; {stopped}; {record}")
        }
    };
    Ok(Report::changed(LEAVE_STEP, detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::Runner;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    /// A member's kubectl, crictl and systemctl: a node holding a web pod
    /// (whose budget refuses the first eviction) and a DaemonSet's pod; a
    /// master running its four control-plane containers.
    #[derive(Debug, Clone, Default)]
    struct Host {
        calls: Arc<Mutex<Vec<String>>>,
        web_evictions: Arc<Mutex<usize>>,
        /// The API server refuses every request.
        api_down: bool,
    }

    impl Runner for Host {
        fn run_with_input(
            &self,
            program: &str,
            args: &[&str],
            _: Option<&Path>,
        ) -> Result<String, StepError> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            if program == "kubectl" && self.api_down {
                return Err(StepError::Invalid {
                    what: line,
                    message: "connection refused".into(),
                });
            }
            let mut evictions = self.web_evictions.lock().unwrap();
            if line.contains("get pods") {
                let web = r#"{"metadata": {"name": "web-1", "namespace": "default", "ownerReferences": [{"kind": "ReplicaSet"}]}, "status": {"phase": "Running"}}"#;
                let proxy = r#"{"metadata": {"name": "kube-proxy-x", "namespace": "kube-system", "ownerReferences": [{"kind": "DaemonSet"}]}, "status": {"phase": "Running"}}"#;
                let items = if *evictions >= 2 {
                    proxy.to_owned()
                } else {
                    format!("{web}, {proxy}")
                };
                return Ok(format!(r#"{{"items": [{items}]}}"#));
            }
            if line.contains("/eviction") {
                assert!(line.contains("pods/web-1/"), "evicted what stays: {line}");
                *evictions += 1;
                if *evictions == 1 {
                    return Err(StepError::Invalid {
                        what: line,
                        message:
                            "Cannot evict pod as it would violate the pod's disruption budget (429)"
                                .into(),
                    });
                }
            }
            if line.contains("--property=MainPID") {
                return Ok("0\n".into());
            }
            if program == "crictl" && args.contains(&"ps") {
                let name = args[args.iter().position(|a| *a == "--name").unwrap() + 1];
                return Ok(format!("{}\n", name.trim_matches(['^', '$'])));
            }
            Ok(String::new())
        }
    }

    async fn context(role: &str, host: Host, dir: &Path) -> Context {
        // Never called: leaving makes no AWS call.
        crate::steps::test_context(role, Box::new(host), dir).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_node_cordons_then_evicts_until_its_budget_allows() {
        let host = Host::default();
        let dir = tempfile::tempdir().unwrap();
        let ctx = context("node", host.clone(), dir.path()).await;
        let report = leave(&ctx).await.unwrap();
        assert!(
            report.detail.contains("drained: 1 evictions"),
            "{}",
            report.detail
        );
        let calls = host.calls.lock().unwrap().clone();
        assert!(
            calls[0].contains("patch node/i-0123456789abcdef0"),
            "{calls:?}"
        );
        assert!(calls[0].contains("unschedulable"), "{calls:?}");
        // As the kubelet itself (NodeRestriction scopes what it may do).
        assert!(
            calls.iter().all(|c| c.contains("kubelet.conf")),
            "{calls:?}"
        );
        assert_eq!(*host.web_evictions.lock().unwrap(), 2, "{calls:?}");
        assert!(!calls.iter().any(|c| c.contains("kube-proxy-x/eviction")));
    }

    /// What a master's leave did after its drain.
    fn stops(calls: &[String]) -> Vec<&str> {
        calls
            .iter()
            .filter(|c| c.contains(" stop "))
            .map(|c| c.rsplit(' ').next().unwrap())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_master_drains_then_stops_kubelet_then_its_control_plane_etcd_last() {
        let host = Host::default();
        let dir = tempfile::tempdir().unwrap();
        let ctx = context("master", host.clone(), dir.path()).await;
        let report = leave(&ctx).await.unwrap();
        assert!(
            report
                .detail
                .starts_with("node/ip-10-0-1-10 drained: 1 evictions in"),
            "{}",
            report.detail
        );
        let calls = host.calls.lock().unwrap().clone();
        assert!(calls[0].contains("patch node/ip-10-0-1-10"), "{calls:?}");
        assert!(calls[0].contains(r#""slipway/cordoned-by":"leave""#));
        let kill = calls
            .iter()
            .position(|c| c == "systemctl kill kubelet.service")
            .unwrap();
        // Every pod gone before kubelet, which would restart none of them.
        assert!(calls[..kill].iter().any(|c| c.contains("web-1/eviction")));
        assert!(calls[kill..].iter().all(|c| !c.starts_with("kubectl")));
        assert_eq!(stops(&calls), STOP_ORDER, "{calls:?}");
        assert_eq!(calls.last().map(String::as_str), Some("sync "));
    }

    #[tokio::test(start_paused = true)]
    async fn a_master_whose_drain_fails_still_stops_etcd_cleanly() {
        let host = Host {
            api_down: true,
            ..Host::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = context("master", host.clone(), dir.path()).await;
        ctx.deadlines.set("drain=10").unwrap();
        let report = leave(&ctx).await.unwrap();
        assert!(
            report.detail.starts_with("not drained (")
                && report.detail.contains("connection refused"),
            "{}",
            report.detail
        );
        let calls = host.calls.lock().unwrap().clone();
        assert_eq!(stops(&calls), STOP_ORDER, "{calls:?}");
    }

    /// The API server as `rejoin` sees it: this member's Node present or
    /// not (a restart of kubelet registers it), or no answer at all.
    #[derive(Debug, Clone, Default)]
    struct Registry {
        calls: Arc<Mutex<Vec<String>>>,
        present: Arc<Mutex<bool>>,
        api_down: bool,
    }

    impl Runner for Registry {
        fn run_with_input(
            &self,
            program: &str,
            args: &[&str],
            _: Option<&Path>,
        ) -> Result<String, StepError> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.lock().unwrap().push(line.clone());
            let mut present = self.present.lock().unwrap();
            match program {
                "systemctl" => *present = true,
                _ if self.api_down => {
                    return Err(StepError::Invalid {
                        what: line,
                        message: "exit status: 1: Unable to connect to the server".into(),
                    })
                }
                _ if !*present => {
                    return Err(StepError::Invalid {
                        what: line,
                        message: r#"exit status: 1: Error from server (NotFound): nodes "i-0123456789abcdef0" not found"#.into(),
                    })
                }
                _ => {}
            }
            Ok("node/i-0123456789abcdef0\n".into())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_never_gets_ready_is_watched_in_slices_within_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = context("node", Host::default(), dir.path()).await;
        ctx.deadlines.set("node-ready=70").unwrap();
        let asked = Mutex::new(Vec::new());
        let kubectl = |args: &[&str]| {
            asked.lock().unwrap().push(args.join(" "));
            Err(StepError::Invalid {
                what: "kubectl wait".into(),
                message: "timed out waiting for the condition".into(),
            })
        };
        let err = until_ready(&ctx, &kubectl, "i-0123456789abcdef0")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("to be Ready"), "{err}");
        let timeouts: Vec<u64> = asked
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                assert!(
                    line.starts_with("wait --for=condition=Ready --timeout=")
                        && line.ends_with(" node/i-0123456789abcdef0 --output=json"),
                    "{line}"
                );
                let t = line.split("--timeout=").nth(1).unwrap();
                t.split('s').next().unwrap().parse().unwrap()
            })
            .collect();
        // Every watch shorter than kubectl's request timeout, the later
        // ones cut to what is left of the 70 s.
        assert_eq!(timeouts.first(), Some(&50), "{timeouts:?}");
        assert!(timeouts.windows(2).all(|w| w[1] <= w[0]), "{timeouts:?}");
        assert!(timeouts.last().is_some_and(|t| *t < 20), "{timeouts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_the_api_lost_is_registered_again_by_restarting_kubelet() {
        let api = Registry::default();
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::steps::test_context("node", Box::new(api.clone()), dir.path()).await;
        // Before this boot saw its Node Ready, absence is the kubelet still
        // registering: not asked at all.
        let early = rejoin(&ctx).await.unwrap();
        assert!(!early.changed, "{early:?}");
        assert!(api.calls.lock().unwrap().is_empty());

        crate::steps::mark(&ctx, IN_SERVICE).unwrap();
        let back = rejoin(&ctx).await.unwrap();
        assert!(back.changed, "{back:?}");
        assert!(back.detail.contains("registered again"), "{back:?}");
        let calls = api.calls.lock().unwrap().clone();
        assert_eq!(
            calls
                .iter()
                .filter(|c| *c == "systemctl restart kubelet.service")
                .count(),
            1,
            "{calls:?}"
        );
        assert!(
            calls[0].contains("get node/i-0123456789abcdef0"),
            "{calls:?}"
        );
        assert!(
            calls[0].contains("kubelet.conf"),
            "as the kubelet: {calls:?}"
        );

        // Present: nothing restarted.
        api.calls.lock().unwrap().clear();
        let steady = rejoin(&ctx).await.unwrap();
        assert!(!steady.changed, "{steady:?}");
        assert!(!api
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("systemctl")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_api_server_that_does_not_answer_restarts_nothing() {
        let api = Registry {
            api_down: true,
            ..Registry::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::steps::test_context("node", Box::new(api.clone()), dir.path()).await;
        crate::steps::mark(&ctx, IN_SERVICE).unwrap();
        let report = rejoin(&ctx).await.unwrap();
        assert!(!report.changed, "{report:?}");
        assert!(report.detail.contains("Unable to connect"), "{report:?}");
        assert!(!api
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("systemctl")));
    }

    #[test]
    fn a_drain_moves_workloads_and_leaves_daemons_mirrors_and_finished_pods() {
        let pod = |extra: serde_json::Value| {
            let mut p = serde_json::json!({"metadata": {"name": "p", "namespace": "default"}, "status": {"phase": "Running"}});
            if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
                for (k, v) in extra {
                    p.insert(k.clone(), v.clone());
                }
            }
            p
        };
        assert!(must_move(&pod(serde_json::json!({}))));
        assert!(must_move(&pod(serde_json::json!({
            "metadata": {"ownerReferences": [{"kind": "ReplicaSet", "name": "web-1"}]}
        }))));
        assert!(!must_move(&pod(serde_json::json!({
            "metadata": {"ownerReferences": [{"kind": "DaemonSet", "name": "kube-proxy"}]}
        }))));
        assert!(!must_move(&pod(serde_json::json!({
            "metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}
        }))));
        assert!(!must_move(&pod(
            serde_json::json!({"status": {"phase": "Succeeded"}})
        )));
    }
}
