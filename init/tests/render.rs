//! The real templates in `manifests/`, rendered for a master and a node and
//! read back as YAML/TOML: every document is a Kubernetes object, every
//! image comes from images.toml, and the settings that matter for safety
//! (etcd's TLS, the service and pod networks) carry the stack's values.

#![allow(clippy::unwrap_used)] // helpers shared by tests

use serde::Deserialize;
use serde_yaml_ng::Value;
use slipway_init::config::StackConfig;
use slipway_init::render::{
    master_node_name, release_held_pods, Inputs, RenderError, Rendered, Target, Templates,
    AFTER_API, HELD_PODS, STATIC_PODS,
};
use std::path::{Path, PathBuf};

const MASTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 1, 10);
const TOKEN: &str = "abcdef.0123456789abcdef";
const EXPIRES: &str = "2027-01-16T08:00:00Z";
const KEY: &str = "c2xpcHdheS10ZXN0LWVuY3J5cHRpb24ta2V5LTMyYnk=";

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn config(role: &str) -> StackConfig {
    let master = if role == "master" {
        "master_eip_allocation = \"eipalloc-0123456789abcdef0\"\nmaster_dns_zone = \"Z0123456789\"\nmaster_addresses = { \"us-east-1a\" = \"10.0.1.10\" }\n"
    } else {
        ""
    };
    let text = format!(
        "role = \"{role}\"\ncluster_name = \"demo\"\nsecrets_bucket = \"demo-secrets\"\napi_name = \"api.demo.slipway.internal\"\npod_cidr = \"10.244.0.0/16\"\nservice_cidr = \"10.96.0.0/12\"\n{master}"
    );
    StackConfig::parse(text.as_bytes()).unwrap()
}

fn render(role: &str) -> Vec<Rendered> {
    let config = config(role);
    let templates = Templates::load(&manifests()).unwrap();
    let master = role == "master";
    templates
        .render(&Inputs {
            config: &config,
            node_name: if master {
                master_node_name(MASTER_IP)
            } else {
                "i-0123456789abcdef0".into()
            },
            node_ip: master.then_some(MASTER_IP),
            pki: PathBuf::from("/srv/kubernetes/pki"),
            bootstrap_token: master.then_some(TOKEN),
            token_expires: master.then_some(EXPIRES),
            encryption_key: master.then_some(KEY),
            release: Some("0.2.0".into()),
        })
        .unwrap()
}

/// A master's inputs with placeholder identity and paths, and `token`.
fn bare_master<'a>(config: &'a StackConfig, token: &'a str) -> Inputs<'a> {
    Inputs {
        config,
        node_name: "n".into(),
        node_ip: None,
        pki: PathBuf::from("/pki"),
        bootstrap_token: Some(token),
        token_expires: Some(EXPIRES),
        encryption_key: Some(KEY),
        release: None,
    }
}

fn file<'a>(files: &'a [Rendered], path: &str) -> &'a Rendered {
    files
        .iter()
        .find(|f| f.path == Path::new(path))
        .unwrap_or_else(|| panic!("{path} not rendered"))
}

fn docs(f: &Rendered) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&f.content)
        .map(|d| Value::deserialize(d).unwrap())
        .collect::<Vec<Value>>()
}

fn command(pod: &Value) -> Vec<String> {
    pod["spec"]["containers"][0]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn images_in(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some("image") {
                    out.push(v.as_str().unwrap().to_owned());
                } else {
                    images_in(v, out);
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| images_in(v, out)),
        _ => {}
    }
}

#[test]
fn a_master_gets_host_config_static_pods_and_addons() {
    let files = render("master");
    let mut paths: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "addons/10-bootstrap.yaml",
            "addons/20-kube-proxy.yaml",
            "addons/30-flannel.yaml",
            "addons/40-coredns.yaml",
            "control-plane/admission.yaml",
            "control-plane/audit-policy.yaml",
            "control-plane/authentication.yaml",
            "control-plane/encryption.yaml",
            "kubernetes/kubelet.env",
            "kubernetes/kubelet.yaml",
            "kubernetes/manifests/etcd.yaml",
            "kubernetes/manifests/kube-apiserver.yaml",
            "kubernetes/manifests/kube-controller-manager.yaml",
            "kubernetes/manifests/kube-scheduler.yaml",
        ]
    );
    // Only the add-ons (which hold the token) and the API server's
    // configuration (which holds the Secrets key) go to the secrets tmpfs.
    for f in &files {
        assert_eq!(
            f.target == Target::Secrets,
            f.path.starts_with("addons") || f.path.starts_with("control-plane"),
            "{}",
            f.path.display()
        );
        assert!(
            !f.content.contains("{{") && !f.content.contains("{%"),
            "{}",
            f.path.display()
        );
    }
}

#[test]
fn every_document_is_an_object_and_every_image_is_pinned_in_images_toml() {
    let templates = Templates::load(&manifests()).unwrap();
    let known: Vec<&String> = templates.images.values().collect();
    let mut seen = Vec::new();
    for f in render("master")
        .iter()
        .filter(|f| f.path.extension().is_some_and(|e| e == "yaml"))
    {
        for doc in docs(f) {
            assert!(
                doc["apiVersion"].is_string(),
                "{}: {doc:?}",
                f.path.display()
            );
            assert!(doc["kind"].is_string(), "{}: {doc:?}", f.path.display());
            images_in(&doc, &mut seen);
        }
    }
    assert!(seen.len() >= 7, "{seen:?}");
    for image in &seen {
        assert!(known.contains(&image), "{image} is not in images.toml");
    }
}

#[test]
fn etcd_speaks_only_tls_with_client_certificates() {
    let files = render("master");
    let pod = &docs(file(&files, "kubernetes/manifests/etcd.yaml"))[0];
    let cmd = command(pod);
    assert!(
        cmd.contains(&"--client-cert-auth=true".to_owned()),
        "{cmd:?}"
    );
    assert!(
        cmd.contains(&"--peer-client-cert-auth=true".to_owned()),
        "{cmd:?}"
    );
    for flag in [
        "--listen-client-urls=",
        "--listen-peer-urls=",
        "--advertise-client-urls=",
    ] {
        let urls = cmd.iter().find_map(|c| c.strip_prefix(flag)).unwrap();
        assert!(
            urls.split(',').all(|u| u.starts_with("https://")),
            "{flag}{urls}"
        );
    }
    assert!(cmd.contains(&"--data-dir=/var/lib/etcd/data".to_owned()));
    assert!(cmd.contains(&"--name=ip-10-0-1-10".to_owned()), "{cmd:?}");
}

#[test]
fn the_control_plane_carries_the_stacks_networks() {
    let files = render("master");
    let api = command(&docs(file(&files, "kubernetes/manifests/kube-apiserver.yaml"))[0]);
    assert!(api.contains(&"--service-cluster-ip-range=10.96.0.0/12".to_owned()));
    assert!(api.contains(&"--advertise-address=10.0.1.10".to_owned()));
    assert!(api.contains(&"--etcd-servers=https://127.0.0.1:2379".to_owned()));
    let kcm = command(
        &docs(file(
            &files,
            "kubernetes/manifests/kube-controller-manager.yaml",
        ))[0],
    );
    assert!(kcm.contains(&"--cluster-cidr=10.244.0.0/16".to_owned()));
    let dns = docs(file(&files, "addons/40-coredns.yaml"));
    let svc = dns.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
    let kubelet = &docs(file(&files, "kubernetes/kubelet.yaml"))[0];
    assert_eq!(kubelet["clusterDNS"][0], "10.96.0.10");
    assert_eq!(kubelet["cgroupDriver"], "systemd");
    // Long enough for containerd to unpack an image at its first container.
    assert_eq!(kubelet["runtimeRequestTimeout"], "10m");
    let flannel = docs(file(&files, "addons/30-flannel.yaml"));
    let cm = flannel.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let net: serde_json::Value =
        serde_json::from_str(cm["data"]["net-conf.json"].as_str().unwrap()).unwrap();
    assert_eq!(net["Network"], "10.244.0.0/16");
    // flanneld reaches the API server by its name, as kube-proxy does,
    // not through the Service address kube-proxy's rules make work.
    let ds = flannel.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let env = &ds["spec"]["template"]["spec"]["containers"][0]["env"];
    let var = |name: &str| {
        env.as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        var("KUBERNETES_SERVICE_HOST"),
        Some("api.demo.slipway.internal".into())
    );
    assert_eq!(var("KUBERNETES_SERVICE_PORT"), Some("6443".into()));
    // No init container: flannel's one container puts the CNI
    // configuration where containerd reads it, then becomes flanneld.
    let pod = &ds["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "{pod:?}");
    let script = pod["containers"][0]["command"][2].as_str().unwrap();
    assert!(
        script.starts_with(
            "cp -f /etc/kube-flannel/cni-conf.json /etc/cni/net.d/10-flannel.conflist && \
             exec /opt/bin/flanneld "
        ),
        "{script}"
    );
    let boot = docs(file(&files, "addons/10-bootstrap.yaml"));
    assert_eq!(boot[0]["metadata"]["name"], "bootstrap-token-abcdef");
    assert_eq!(boot[0]["stringData"]["token-secret"], "0123456789abcdef");
    // The token cleaner deletes it once it expires.
    assert_eq!(boot[0]["stringData"]["expiration"], EXPIRES);
}

#[test]
fn cluster_dns_tolerates_the_taint_the_master_registers_with_and_spreads() {
    let files = render("master");
    let env = &file(&files, "kubernetes/kubelet.env").content;
    let taint = env
        .split_whitespace()
        .find_map(|a| a.strip_prefix("--register-with-taints="))
        .expect("the master registers with a taint");
    let (key, effect) = taint.trim_end_matches('"').split_once(':').unwrap();
    let dns = docs(file(&files, "addons/40-coredns.yaml"));
    let deployment = dns.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let tolerated = pod["tolerations"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|t| t["key"] == key && t["operator"] == "Exists" && t["effect"] == effect);
    assert!(
        tolerated,
        "{key}:{effect} not tolerated: {:?}",
        pod["tolerations"]
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        spread["labelSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn containerd_pins_the_sandbox_image_of_images_toml_and_runs_crun_with_systemd_cgroups() {
    let templates = Templates::load(&manifests()).unwrap();
    let text = std::fs::read_to_string(manifests().join("host/containerd.toml")).unwrap();
    let conf: toml::Value = toml::from_str(&text).unwrap();
    let images = &conf["plugins"]["io.containerd.cri.v1.images"];
    assert_eq!(
        images["pinned_images"]["sandbox"].as_str(),
        Some(templates.images["pause"].as_str())
    );
    let containerd = &conf["plugins"]["io.containerd.cri.v1.runtime"]["containerd"];
    let default = containerd["default_runtime_name"].as_str().unwrap();
    let runtime = &containerd["runtimes"][default];
    assert_eq!(
        runtime["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    assert_eq!(runtime["options"]["SystemdCgroup"].as_bool(), Some(true));
    // The image has no runc: the shim must be told which runtime to run.
    assert_eq!(
        runtime["options"]["BinaryName"].as_str(),
        Some("/usr/bin/crun")
    );
}

#[test]
fn a_node_gets_only_host_config_under_its_instance_id() {
    let files = render("node");
    assert_eq!(files.len(), 2, "{files:?}");
    let env = &file(&files, "kubernetes/kubelet.env").content;
    assert!(
        env.contains("--hostname-override=i-0123456789abcdef0"),
        "{env}"
    );
    assert!(!env.contains("control-plane"), "{env}");
    // A node runs no static pods, so its kubelet watches no directory.
    let kubelet = &docs(file(&files, "kubernetes/kubelet.yaml"))[0];
    assert!(kubelet.get("staticPodPath").is_none(), "{kubelet:?}");
    assert_eq!(kubelet["cgroupDriver"], "systemd");
    let master = render("master");
    let kubelet = &docs(file(&master, "kubernetes/kubelet.yaml"))[0];
    assert_eq!(kubelet["staticPodPath"], "/etc/kubernetes/manifests");
    let env = &file(&master, "kubernetes/kubelet.env").content;
    assert!(env.contains("--node-ip=10.0.1.10"), "{env}");
    assert!(
        env.contains("node-role.kubernetes.io/control-plane:NoSchedule"),
        "{env}"
    );
    // kubelet refuses to start when it is asked to set a node-role label.
    assert!(!env.contains("--node-labels=node-role"), "{env}");
    // Both label themselves with their image's release.
    assert!(env.contains("--node-labels=slipway/release=0.2.0"), "{env}");
}

#[test]
fn the_release_label_is_the_image_version_when_it_can_be_a_label() {
    use slipway_init::render::release_label;
    let os = |v: &str| format!("PRETTY_NAME=\"Debian\"\nIMAGE_ID=slipway\nIMAGE_VERSION={v}\n");
    assert_eq!(release_label(&os("0.2.0")).as_deref(), Some("0.2.0"));
    assert_eq!(
        release_label(&os("\"1.0.0-rc1\"")).as_deref(),
        Some("1.0.0-rc1")
    );
    for bad in ["", "0.2.0+build", "-0.2", &"9".repeat(64)] {
        assert_eq!(release_label(&os(bad)), None, "{bad:?}");
    }
    assert_eq!(release_label("ID=debian\n"), None);
}

#[test]
fn a_broken_template_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |rel: &str| {
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(manifests().join(rel), &to).unwrap();
    };
    for rel in ["images.toml", "host/kubelet.yaml", "host/kubelet.env"] {
        copy(rel);
    }
    for sub in ["addons", "static", "control-plane"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::write(
        dir.path().join("static/broken.yaml"),
        "image: {{ images.etcd ",
    )
    .unwrap();
    let err = Templates::load(dir.path()).unwrap_err();
    assert!(matches!(err, RenderError::Template { .. }), "{err}");
    assert!(err.to_string().contains("static/broken.yaml"), "{err}");

    // An image the templates use but images.toml lacks.
    std::fs::write(
        dir.path().join("static/broken.yaml"),
        "image: {{ images.nope }}\n",
    )
    .unwrap();
    let config = config("master");
    let err = Templates::load(dir.path())
        .unwrap()
        .render(&bare_master(&config, TOKEN))
        .unwrap_err();
    assert!(err.to_string().contains("static/broken.yaml"), "{err}");
}

#[test]
fn static_pods_give_a_slow_start_room_before_liveness_kills_it() {
    // Probes with the default 1 s timeout and no startup probe restart a
    // control plane that starts slowly (a loaded or small instance) forever.
    // Four minutes was not enough: an API server restarted on a busy
    // emulated master was not live within them, was killed, and started
    // again from nothing, over and over. Once started, one that a busy host
    // starves fails its probes for minutes; killing it after 80 s (8 × 10 s)
    // sent it back to that costly start, again and again.
    let files = render("master");
    for f in files
        .iter()
        .filter(|f| f.path.starts_with("kubernetes/manifests"))
    {
        let pod = &docs(f)[0];
        let container = &pod["spec"]["containers"][0];
        let name = f.path.display();
        assert!(
            seconds_before_kill(&container["startupProbe"]) >= 600,
            "{name}: the startup probe allows less than 10 minutes"
        );
        assert!(
            seconds_before_kill(&container["livenessProbe"]) >= 300,
            "{name}: the liveness probe kills within 5 minutes of slow answers"
        );
        for probe in ["livenessProbe", "startupProbe"] {
            assert!(
                container[probe]["timeoutSeconds"].as_u64().unwrap_or(1) >= 15,
                "{name}: {probe} times out in under 15 s"
            );
        }
    }
}

#[test]
fn the_api_servers_liveness_leaves_etcds_latency_to_readiness() {
    // /livez includes a read from etcd that must answer within 2 s; on a
    // busy emulated master it failed for five minutes and the kubelet
    // killed an API server that was answering, slowly.
    let files = render("master");
    let apiserver = files
        .iter()
        .find(|f| f.path.ends_with("kubernetes/manifests/kube-apiserver.yaml"))
        .expect("the API server's static pod");
    let container = &docs(apiserver)[0]["spec"]["containers"][0];
    // Nor is it killed for five minutes of handshakes slower than 10 s:
    // that was a busy emulated master's API server, answering.
    assert!(
        seconds_before_kill(&container["livenessProbe"]) >= 600,
        "the API server's liveness kills within 10 minutes"
    );
    for probe in ["livenessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["path"].as_str(),
            Some("/livez?exclude=etcd"),
            "{probe}"
        );
    }
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
}

/// How long a probe fails before the kubelet acts on it (Kubernetes'
/// defaults where it says nothing: 3 failures, 10 s apart).
fn seconds_before_kill(probe: &Value) -> u64 {
    probe["failureThreshold"].as_u64().unwrap_or(3) * probe["periodSeconds"].as_u64().unwrap_or(10)
}

/// The containers of every pod template in a document, wherever they sit.
fn containers_in(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    (Some("containers" | "initContainers"), Value::Sequence(list)) => {
                        out.extend(list.iter().cloned());
                    }
                    _ => containers_in(v, out),
                }
            }
        }
        Value::Sequence(s) => s.iter().for_each(|v| containers_in(v, out)),
        _ => {}
    }
}

#[test]
fn the_control_plane_and_flannel_request_cpu_so_none_is_best_effort() {
    // A pod that requests nothing runs in a cgroup weighing 1 against what
    // a request buys: any DaemonSet asking for CPU would outweigh the whole
    // control plane on a busy master (manifests/README.md).
    let mut requesting = Vec::new();
    for f in render("master")
        .iter()
        .filter(|f| f.path.extension().is_some_and(|e| e == "yaml"))
    {
        for doc in docs(f) {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let control_plane = doc["kind"].as_str() == Some("Pod")
                && doc["metadata"]["labels"]["tier"].as_str() == Some("control-plane");
            let flannel = doc["kind"].as_str() == Some("DaemonSet") && name == "kube-flannel";
            if !(control_plane || flannel) {
                continue;
            }
            let mut containers = Vec::new();
            containers_in(&doc, &mut containers);
            for c in containers {
                let millicores = c["resources"]["requests"]["cpu"]
                    .as_str()
                    .and_then(|cpu| cpu.strip_suffix('m'))
                    .and_then(|m| m.parse::<u32>().ok());
                assert!(
                    millicores.is_some_and(|m| m > 0),
                    "{name}: {:?} requests no CPU",
                    c["name"]
                );
            }
            requesting.push(name.to_owned());
        }
    }
    requesting.sort();
    assert_eq!(
        requesting,
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-flannel",
            "kube-scheduler"
        ]
    );
}

#[test]
fn no_container_ever_pulls_an_image() {
    let mut all = Vec::new();
    for f in render("master")
        .iter()
        .filter(|f| f.path.extension().is_some_and(|e| e == "yaml"))
    {
        for doc in docs(f) {
            containers_in(&doc, &mut all);
        }
    }
    assert!(all.len() >= 7, "{all:?}");
    for c in &all {
        assert_eq!(
            c["imagePullPolicy"].as_str(),
            Some("Never"),
            "{:?} may pull its image",
            c["name"]
        );
    }
}

#[test]
fn the_control_plane_is_hardened() {
    let files = render("master");
    let flags =
        |pod: &str| command(&docs(file(&files, &format!("kubernetes/manifests/{pod}.yaml")))[0]);
    let api = flags("kube-apiserver");
    for flag in [
        "--profiling=false",
        "--tls-min-version=VersionTLS12",
        "--kubelet-certificate-authority=/srv/kubernetes/pki/ca.crt",
        "--authentication-config=/srv/kubernetes/control-plane/authentication.yaml",
        "--encryption-provider-config=/srv/kubernetes/control-plane/encryption.yaml",
        "--audit-policy-file=/srv/kubernetes/control-plane/audit-policy.yaml",
        "--admission-control-config-file=/srv/kubernetes/control-plane/admission.yaml",
        "--enable-admission-plugins=NodeRestriction,PodSecurity",
    ] {
        assert!(
            api.contains(&flag.to_owned()),
            "the API server lacks {flag}"
        );
    }
    assert!(
        !api.iter().any(|f| f.starts_with("--anonymous-auth")),
        "{api:?}"
    );
    for pod in ["kube-controller-manager", "kube-scheduler"] {
        let cmd = flags(pod);
        for flag in ["--profiling=false", "--tls-min-version=VersionTLS12"] {
            assert!(cmd.contains(&flag.to_owned()), "{pod} lacks {flag}");
        }
    }
    assert!(flags("etcd").contains(&"--tls-min-version=TLS1.2".to_owned()));

    // Anonymous requests reach the health endpoints and nothing else.
    let authn = &docs(file(&files, "control-plane/authentication.yaml"))[0];
    let paths: Vec<&str> = authn["anonymous"]["conditions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/livez", "/readyz", "/healthz"]);
    // Secrets encrypted with the bundle's key before anything else.
    let enc = &docs(file(&files, "control-plane/encryption.yaml"))[0];
    let providers = &enc["resources"][0]["providers"];
    assert_eq!(
        providers[0]["aescbc"]["keys"][0]["secret"].as_str(),
        Some(KEY)
    );
    // Baseline for every namespace but the control plane's.
    let admission = &docs(file(&files, "control-plane/admission.yaml"))[0];
    let pss = &admission["plugins"][0]["configuration"];
    assert_eq!(pss["defaults"]["enforce"].as_str(), Some("baseline"));
    assert_eq!(
        pss["exemptions"]["namespaces"][0].as_str(),
        Some("kube-system")
    );
    // The audit log records, and never bodies.
    let audit = &docs(file(&files, "control-plane/audit-policy.yaml"))[0];
    for rule in audit["rules"].as_sequence().unwrap() {
        let level = rule["level"].as_str().unwrap();
        assert!(matches!(level, "None" | "Metadata"), "audit level {level}");
    }
    // kubelet: TLS 1.2 and the kernel's settings checked, not changed.
    let kubelet = &docs(file(&files, "kubernetes/kubelet.yaml"))[0];
    assert_eq!(kubelet["tlsMinVersion"].as_str(), Some("VersionTLS12"));
    assert_eq!(kubelet["protectKernelDefaults"].as_bool(), Some(true));
}

#[test]
fn the_controller_manager_and_the_scheduler_serve_the_pair_made_at_boot() {
    let files = render("master");
    for ((stem, cn), pod) in slipway_init::pki::LOOPBACK_SERVING
        .iter()
        .zip(["kube-controller-manager", "kube-scheduler"])
    {
        assert_eq!(*cn, pod);
        let manifest = &docs(file(&files, &format!("kubernetes/manifests/{pod}.yaml")))[0];
        let cmd = command(manifest);
        let crt = format!("/srv/kubernetes/pki/{stem}.crt");
        let key = format!("/srv/kubernetes/pki/{stem}.key");
        for (flag, path) in [("--tls-cert-file", &crt), ("--tls-private-key-file", &key)] {
            assert!(cmd.contains(&format!("{flag}={path}")), "{pod}: {cmd:?}");
            // Each file is inside what the pod mounts from the host.
            let mounts = manifest["spec"]["containers"][0]["volumeMounts"]
                .as_sequence()
                .unwrap();
            assert!(
                mounts
                    .iter()
                    .any(|m| path.starts_with(m["mountPath"].as_str().unwrap())),
                "{pod} does not mount {path}"
            );
        }
    }
}

#[test]
fn a_malformed_token_is_named_by_its_fingerprint_never_its_value() {
    let config = config("master");
    let secret = "abcdef.0123456789abcdefXYZ";
    let err = Templates::load(&manifests())
        .unwrap()
        .render(&bare_master(&config, secret))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("0123456789abcdef"), "{err}");
    assert!(
        err.contains(&slipway_init::pki::fingerprint(secret)),
        "{err}"
    );
}

#[test]
fn the_api_servers_clients_start_only_once_it_answers() {
    let etc = tempfile::tempdir().unwrap();
    let write = |files: &[Rendered]| {
        for f in files.iter().filter(|f| f.target == Target::Etc) {
            let path = f.destination(etc.path());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &f.content).unwrap();
        }
    };
    let listed = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(etc.path().join(dir))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let files = render("master");
    write(&files);
    assert_eq!(listed(STATIC_PODS), ["etcd.yaml", "kube-apiserver.yaml"]);
    assert_eq!(listed(HELD_PODS), AFTER_API);

    let released = release_held_pods(etc.path()).unwrap();
    assert_eq!(released, AFTER_API);
    assert_eq!(listed(STATIC_PODS).len(), 4);
    assert!(listed(HELD_PODS).is_empty());
    // Rendered again in the same boot (slipway-init run once more): what
    // the kubelet already runs is updated in place, nothing is held again.
    write(&files);
    assert!(listed(HELD_PODS).is_empty());
    assert!(release_held_pods(etc.path()).unwrap().is_empty());
    // A node holds nothing, and has nothing to release.
    let node = tempfile::tempdir().unwrap();
    assert!(release_held_pods(node.path()).unwrap().is_empty());
}
