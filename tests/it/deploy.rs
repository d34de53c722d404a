//! What nbt ships for machines and fleets (deploy/): the Kubernetes manifests, validated offline
//! against the Kubernetes API's schemas (kubernetes-validate, installed by `cargo xtask setup`)
//! and against each other and nbt's own flags; the agent's systemd unit, checked by
//! systemd-analyze. No real cluster or systemd ran them here.

use std::path::{Path, PathBuf};
use std::process::Command;

use nbt_integration_tests::nbt;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// kubernetes-validate's Python, whose PyYAML reads the manifests for the cross-checks.
fn tools() -> PathBuf {
    workspace().join("target/tools/kubernetes-validate/bin")
}

#[test]
fn kubernetes_manifests_pass_the_apis_schemas() {
    let validate = tools().join("kubernetes-validate");
    assert!(
        validate.exists(),
        "{} is missing: `cargo xtask setup` installs it",
        validate.display()
    );
    let dir = workspace().join("deploy/kubernetes");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        // The Prometheus Operator's kind: no schema of the Kubernetes API; cross-checked below.
        .filter(|p| !p.ends_with("servicemonitor.yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 4, "{manifests:?}");
    let out = Command::new(&validate)
        .arg("--strict")
        .args(&manifests)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        manifests.len(),
        "{text}"
    );
}

/// The pieces name each other: the Service selects the DaemonSet's pods and port, the
/// ServiceMonitor and the scrape job select the Service, the token volume names the Secret and
/// the agent's --token-file its mount, and every flag the DaemonSet passes is one of nbt agent's.
#[test]
fn kubernetes_manifests_agree_with_each_other_and_with_nbt() {
    const CHECK: &str = r#"
import sys, yaml
d = sys.argv[1]
load = lambda f: yaml.safe_load(open(f"{d}/{f}"))
ds, svc, sm, secret = load("daemonset.yaml"), load("service.yaml"), load("servicemonitor.yaml"), load("secret.example.yaml")
scrape = yaml.safe_load(open(f"{d}/prometheus/scrape.yml"))
pod = ds["spec"]["template"]
labels = pod["metadata"]["labels"]
assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items(), "daemonset selector"
assert svc["spec"]["selector"].items() <= labels.items(), "service selects the agent's pods"
c = pod["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
sp = svc["spec"]["ports"][0]
assert sp["targetPort"] in ports and ports[sp["targetPort"]] == 8787, "service port"
assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(), "servicemonitor selects the service"
assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
assert sm["spec"]["endpoints"][0]["port"] == sp["name"], "servicemonitor port"
assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(sp["port"])
job = scrape["scrape_configs"][0]
assert job["relabel_configs"][0]["regex"] == f'{svc["metadata"]["name"]};{sp["name"]}', "scrape job keeps the service"
assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [svc["metadata"]["namespace"]]
vols = {v["name"]: v for v in pod["spec"]["volumes"]}
mounts = {m["name"]: m for m in c["volumeMounts"]}
assert vols["token"]["secret"]["secretName"] == secret["metadata"]["name"], "token secret"
key = mounts["token"]["subPath"]
assert key in secret["stringData"], "token key"
assert vols["token"]["secret"]["defaultMode"] == 0o600, "token mode"
args = c["args"]
assert args[args.index("--token-file") + 1] == mounts["token"]["mountPath"], "token path"
assert pod["spec"]["hostPID"] is True and c["securityContext"]["privileged"] is True
for m in ("cgroup", "bpf", "runs", "state"):
    assert vols[m]["hostPath"]["path"] == mounts[m]["mountPath"], m
print(" ".join(a for a in args if a.startswith("--")))
"#;
    let dir = workspace().join("deploy/kubernetes");
    let out = Command::new(tools().join("python3"))
        .args(["-c", CHECK])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = nbt(&["agent", "--help"]).stdout();
    for flag in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        assert!(
            help.contains(&format!("{flag} ")),
            "the DaemonSet passes {flag}, which nbt agent does not take"
        );
    }
}

/// The agent's unit, as the package installs it, with nbt where the unit says it is.
#[test]
fn the_agents_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(workspace().join("deploy/debian/nbt-agent.service"))
        .unwrap()
        .replace(
            "/usr/bin/nbt",
            nbt_integration_tests::nbt_bin().to_str().unwrap(),
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbt-agent.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (the systemd package)");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}
