//! packaging/kubernetes validates against the Kubernetes schema, offline (kubernetes-validate
//! carries the schemas), and the corral.toml its ConfigMap holds is a valid corral config.
//! `cargo xtask test` makes the validator's venv (target/kube/venv) before the tests run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn manifest() -> PathBuf {
    root().join("packaging/kubernetes/corral-fastapi.yaml")
}

/// `kubernetes-validate --strict FILE`: (success, output).
fn validate(file: &Path) -> (bool, String) {
    let bin = root().join("target/kube/venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask test` makes it (a venv with kubernetes-validate from PyPI)",
        bin.display()
    );
    let out = Command::new(&bin)
        .arg("--strict")
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn manifests_validate_against_the_kubernetes_schema() {
    let (ok, text) = validate(&manifest());
    assert!(ok, "{text}");
    for kind in [
        "configmap/corral-fastapi",
        "deployment/corral-fastapi",
        "service/corral-fastapi",
        "poddisruptionbudget/corral-fastapi",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{text}"
        );
    }
    // The validator rejects what the schema does not allow: a misspelt field in the
    // Deployment's probe.
    let text = std::fs::read_to_string(manifest()).expect("manifest");
    let broken = text.replacen("periodSeconds: 10", "periodSecond: 10", 1);
    assert_ne!(broken, text);
    let dir = std::env::temp_dir().join(format!("corral-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("broken.yaml");
    std::fs::write(&file, broken).expect("write");
    let (ok, out) = validate(&file);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok, "a misspelt field passed: {out}");
    assert!(out.contains("periodSecond"), "{out}");
}

/// The ConfigMap's `corral.toml: |` block, dedented.
fn embedded_config(yaml: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "corral.toml: |");
    let head = lines.next().expect("a corral.toml block");
    let indent = head.len() - head.trim_start().len() + 2;
    lines
        .take_while(|l| l.is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_configmap_holds_a_valid_corral_config() {
    let yaml = std::fs::read_to_string(manifest()).expect("manifest");
    let text = embedded_config(&yaml);
    // The image's own config (Containerfile, cargo xtask image) is the ConfigMap's.
    let file = root().join("packaging/kubernetes/corral.toml");
    let image = std::fs::read_to_string(&file).expect("packaging/kubernetes/corral.toml");
    assert_eq!(
        text.trim_end(),
        image.trim_end(),
        "the ConfigMap's corral.toml and {} differ",
        file.display()
    );
    let cfg = corral::config::load_str(
        Path::new("/etc/corral/corral.toml"),
        &text,
        &corral::sys::users::SystemLookup,
    )
    .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let api = cfg.apps.values().next().expect("one app");
    assert_eq!(api.listen.address.port(), 8000);
    assert_eq!(cfg.agent.metrics.map(|m| m.port()), Some(9466));
    // The probes and the Service name the ports the config binds.
    assert!(yaml.contains("containerPort: 8000") && yaml.contains("containerPort: 9466"));
    // 2 workers of memory_max + the agent's reserve fit the pod's 2Gi limit.
    let per = api.workers.memory_max.expect("memory_max").0;
    assert!(2 * per + (64 << 20) <= 2 << 30, "{per}");
    assert!(yaml.contains("memory: 2Gi") && yaml.contains("cpu: \"2\""));
    // The preStop sleep, the drain and the workers' stop fit in the grace period, so corral's
    // own stop finishes before the kubelet's SIGKILL.
    let number_after = |key: &str| -> u64 {
        let at = yaml
            .find(key)
            .unwrap_or_else(|| panic!("{key} in the manifest"))
            + key.len();
        yaml[at..]
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("a number after {key}"))
    };
    let grace = number_after("terminationGracePeriodSeconds:");
    let pre_stop = number_after("sleep:\n                seconds:");
    let needed =
        Duration::from_secs(pre_stop) + corral::policy::drain::MAX_DRAIN + api.workers.stop_timeout;
    assert!(
        needed < Duration::from_secs(grace),
        "preStop {pre_stop}s + drain + stop_timeout = {needed:?}, grace {grace}s"
    );
}
