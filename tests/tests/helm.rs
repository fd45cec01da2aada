//! The Helm chart in `deploy/helm/lvmlocal` against the kustomize base it is
//! rendered from: the default render and each kustomize overlay agree object
//! for object, every values file renders objects that lose no field in
//! their types, the schema refuses bad values, and `helm lint` is clean.
//!
//! Needs `helm` and `kubectl` from scripts/components.sh.

use std::collections::BTreeMap;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use lvmlocal_tests::cluster::{component, workspace_root};
use lvmlocal_tests::manifests::{CHART, check_typed, describe, helm_template, one, render, same};
use serde_json::{Value, json};

/// The labels Helm adds, which kustomize has no word for.
const HELM_LABELS: [&str; 3] = [
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "helm.sh/chart",
];

/// Every values file of the chart's `ci/` folder.
const VALUES_FILES: [&str; 6] = [
    "ci/custom.yaml",
    "ci/extender-network-policy.yaml",
    "ci/monitoring.yaml",
    "ci/namespace.yaml",
    "ci/no-extender.yaml",
    "ci/snapshots.yaml",
];

fn values(file: &str) -> String {
    workspace_root()
        .join(CHART)
        .join(file)
        .display()
        .to_string()
}

/// Kinds kustomize 5.8 does not know to be cluster-scoped: its namespace
/// transformer gives them a namespace, which the API server drops.
const SCOPE_UNKNOWN_TO_KUSTOMIZE: [&str; 2] = [
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// The objects by kind, namespace and name, without Helm's labels (and
/// without the namespace kustomize gives cluster-scoped objects).
fn by_name(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|mut object| {
            if SCOPE_UNKNOWN_TO_KUSTOMIZE.contains(&object["kind"].as_str().unwrap_or_default())
                && let Some(metadata) = object["metadata"].as_object_mut()
            {
                metadata.remove("namespace");
            }
            if let Some(labels) = object["metadata"]["labels"].as_object_mut() {
                for label in HELM_LABELS {
                    labels.remove(label);
                }
            }
            (describe(&object), object)
        })
        .collect()
}

/// Asserts that the chart with `args` renders what `kubectl kustomize dir`
/// renders, object for object.
fn agrees(args: &[&str], dir: &str) {
    let chart = by_name(helm_template(args));
    let kustomize = by_name(render(dir));
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        kustomize.keys().collect::<Vec<_>>(),
        "{args:?} and {dir} render different objects"
    );
    for (name, object) in &chart {
        if let Err(at) = same(object, &kustomize[name], "", 0) {
            panic!("{args:?} and {dir} differ in {name} at {at}");
        }
    }
}

fn pods(objects: &[Value]) -> Vec<PodSpec> {
    let mut pods = vec![
        one::<DaemonSet>(objects, "DaemonSet", "lvmlocal-agent")
            .spec
            .unwrap()
            .template
            .spec
            .unwrap(),
    ];
    for name in ["lvmlocal-controller", "lvmlocal-scheduler"] {
        pods.push(
            one::<Deployment>(objects, "Deployment", name)
                .spec
                .unwrap()
                .template
                .spec
                .unwrap(),
        );
    }
    pods
}

#[test]
fn the_default_render_is_the_kustomize_base() {
    agrees(&[], "deploy");
    // Helm's labels are on every object, CRDs aside (Helm installs those
    // as they are).
    for object in helm_template(&[]) {
        if object["kind"] == "CustomResourceDefinition" {
            continue;
        }
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "Helm",
            "{}",
            describe(&object)
        );
    }
}

#[test]
fn values_files_render_what_the_overlays_do() {
    for (file, overlay) in [
        ("ci/no-extender.yaml", "deploy/overlays/no-extender"),
        ("ci/namespace.yaml", "deploy/overlays/namespace"),
        ("ci/monitoring.yaml", "deploy/overlays/monitoring"),
        (
            "ci/extender-network-policy.yaml",
            "deploy/overlays/extender-network-policy",
        ),
        ("ci/snapshots.yaml", "deploy/overlays/snapshots"),
    ] {
        agrees(&["-f", &values(file)], overlay);
    }
}

/// `check_typed`, except for the VolumeSnapshotClass of the snapshots
/// component, which k8s-openapi has no type for: tests/tests/deploy.rs
/// checks the overlay's against external-snapshotter's CRD, and
/// `values_files_render_what_the_overlays_do` that the chart renders the
/// same object.
fn check_object(object: &Value) {
    if object["apiVersion"] == "snapshot.storage.k8s.io/v1"
        && object["kind"] == "VolumeSnapshotClass"
    {
        assert_eq!(object["driver"], "lvmlocal.io", "{}", describe(object));
        return;
    }
    check_typed(object);
}

#[test]
fn the_charts_crds_are_the_generated_ones() {
    let chart = std::fs::read_to_string(workspace_root().join(CHART).join("crds/lvmlocal.io.yaml"))
        .unwrap();
    assert_eq!(chart, csi_controller::crdgen::yaml().unwrap());
}

#[test]
fn every_values_file_renders_objects_that_lose_no_field_in_their_types() {
    let listed: Vec<String> = VALUES_FILES.iter().map(|f| f.to_string()).collect();
    let mut present: Vec<String> = std::fs::read_dir(workspace_root().join(CHART).join("ci"))
        .unwrap()
        .map(|entry| format!("ci/{}", entry.unwrap().file_name().to_string_lossy()))
        .collect();
    present.sort();
    assert_eq!(listed, present, "VALUES_FILES must name every file of ci/");
    for file in VALUES_FILES {
        let objects = helm_template(&["-f", &values(file)]);
        let mut seen = std::collections::BTreeSet::new();
        for object in &objects {
            check_object(object);
            assert!(
                seen.insert(describe(object)),
                "{file}: {} twice",
                describe(object)
            );
        }
    }
}

#[test]
fn custom_values_reach_every_object() {
    let objects = helm_template(&["-f", &values("ci/custom.yaml")]);
    assert!(
        !objects.iter().any(|o| o["kind"] == "Namespace"),
        "namespace.create: false makes none"
    );
    for object in &objects {
        if object["metadata"]["namespace"].is_string() {
            assert_eq!(
                object["metadata"]["namespace"],
                "storage",
                "{}",
                describe(object)
            );
        }
    }
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy")
        .expect("the extender's NetworkPolicy");
    assert_eq!(policy["metadata"]["namespace"], "storage");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"],
        json!([
            {"ipBlock": {"cidr": "10.0.0.10/32"}},
            {"ipBlock": {"cidr": "10.0.0.11/32"}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        ])
    );
    let pods = pods(&objects);
    for pod in &pods {
        for container in &pod.containers {
            let image = container.image.as_deref().unwrap();
            assert!(image.starts_with("registry.example.com/"), "{image}");
            assert_eq!(container.image_pull_policy.as_deref(), Some("Always"));
        }
    }
    let [agent, controller, scheduler] = &pods[..] else {
        unreachable!()
    };
    assert_eq!(agent.node_selector.as_ref().unwrap()["storage"], "local");
    let tolerations = agent.tolerations.as_ref().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(tolerations[0].key.as_deref(), Some("dedicated"));
    let resources = agent.containers[0].resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "1Gi");
    assert!(
        controller
            .node_selector
            .as_ref()
            .unwrap()
            .contains_key("node-role.kubernetes.io/infra")
    );
    let deployment: Deployment = one(&objects, "Deployment", "lvmlocal-controller");
    assert_eq!(deployment.spec.unwrap().replicas, Some(3));
    let provisioner = controller
        .containers
        .iter()
        .find(|c| c.name == "csi-provisioner")
        .unwrap();
    let args = provisioner.args.clone().unwrap();
    assert!(
        !args.iter().any(|a| a.contains("capacity")),
        "storageCapacity: false: {args:?}"
    );
    let driver: CSIDriver = one(&objects, "CSIDriver", "lvmlocal.io");
    assert_eq!(driver.spec.storage_capacity, Some(false));
    // snapshots.enabled: csi-snapshotter with its own image (checked with
    // the others above) and resources, its RBAC bound in the namespace, and
    // the class.
    let snapshotter = controller
        .containers
        .iter()
        .find(|c| c.name == "csi-snapshotter")
        .expect("snapshots.enabled: true adds csi-snapshotter");
    let resources = snapshotter.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "128Mi");
    let binding: ClusterRoleBinding = one(
        &objects,
        "ClusterRoleBinding",
        "lvmlocal-controller-snapshots",
    );
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].namespace.as_deref(), Some("storage"));
    assert!(
        objects
            .iter()
            .any(|o| o["kind"] == "VolumeSnapshotClass" && o["metadata"]["name"] == "lvmlocal")
    );
    let args = scheduler.containers[0].args.clone().unwrap();
    assert!(
        args.contains(&"--default-placement=spread".to_owned()),
        "{args:?}"
    );

    let classes: Vec<StorageClass> = objects
        .iter()
        .filter(|o| o["kind"] == "StorageClass")
        .map(|o| serde_json::from_value(o.clone()).unwrap())
        .collect();
    assert_eq!(classes.len(), 2);
    let fast = &classes[0];
    assert_eq!(fast.metadata.name.as_deref(), Some("fast"));
    assert_eq!(fast.reclaim_policy.as_deref(), Some("Retain"));
    assert_eq!(
        fast.metadata.annotations.as_ref().unwrap()["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    let parameters = fast.parameters.as_ref().unwrap();
    assert_eq!(parameters["lvmlocal.io/media"], "nvme");
    assert_eq!(parameters["csi.storage.k8s.io/fstype"], "xfs");
    assert_eq!(parameters["lvmlocal.io/placement"], "spread");
    assert_eq!(parameters["lvmlocal.io/on-node-loss"], "recreate");
    let bare = &classes[1];
    assert_eq!(bare.metadata.name.as_deref(), Some("bare"));
    assert_eq!(bare.reclaim_policy.as_deref(), Some("Delete"));
    assert_eq!(bare.metadata.annotations, None);
    assert_eq!(
        bare.parameters.clone().unwrap(),
        [("lvmlocal.io/media".to_owned(), "hdd".to_owned())].into()
    );

    // The agent reads the configuration the chart writes.
    let config: ConfigMap = one(&objects, "ConfigMap", "lvmlocal-agent");
    let toml = &config.data.unwrap()["agent.toml"];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let file =
        csi_agent::config::ConfigFile::load(&path).unwrap_or_else(|err| panic!("{err}:\n{toml}"));
    assert_eq!(file.claim_disks, Some(true));
    assert_eq!(file.rescan_interval_secs, Some(120));
    assert_eq!(file.min_disk_bytes, Some(10 << 30));
    assert_eq!(file.deny, Some(vec!["pci-0000:00:1f.2-ata-*".to_owned()]));
    assert_eq!(file.media_override.len(), 1);
    assert_eq!(file.media_override[0].slot, "pci-0000:00:05.0-nvme-1");
}

/// `helm` with these arguments in the workspace root; its status and
/// standard error.
fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(component("helm"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn the_schema_refuses_bad_values() {
    for (set, said) in [
        ("storageClasses[0].media=tape", "storageClasses/0/media"),
        ("extender.placement=random", "extender/placement"),
        ("images.pullPolicy=Sometimes", "images/pullPolicy"),
        ("agent.config.claim_disk=true", "claim_disk"),
        (
            "storageClasses[0].parameters.lvmlocal\\.io/medai=ssd",
            "lvmlocal.io/medai",
        ),
        (
            "agent.config.rescan_interval_secs=0",
            "rescan_interval_secs",
        ),
        ("namespace.name=Bad_Name", "namespace/name"),
        ("snapshots.enabled=yes", "snapshots/enabled"),
        ("snapshots.class=lvmlocal", "snapshots"),
        // The agent registers with kubelet itself: there is no registrar.
        (
            "images.nodeDriverRegistrar=registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.15.0",
            "nodeDriverRegistrar",
        ),
    ] {
        let (ok, output) = helm(&["template", "x", CHART, "--set", set]);
        assert!(!ok, "--set {set} was taken");
        assert!(output.contains(said), "--set {set}: {output}");
    }
}

#[test]
fn helm_lint_is_clean() {
    let (ok, output) = helm(&["lint", "--strict", CHART]);
    assert!(ok && output.contains("0 chart(s) failed"), "{output}");
    for file in VALUES_FILES {
        let (ok, output) = helm(&["lint", "--strict", CHART, "-f", &values(file)]);
        assert!(ok, "{file}: {output}");
    }
}

/// The values of `values.yaml` an operator sets, by dotted path: objects
/// are walked into, except the agent's configuration file and each
/// container's resources, which are set whole.
fn value_paths(value: &Value, at: &str, paths: &mut Vec<String>) {
    let whole = at == "agent.config" || at.starts_with("resources.");
    match value.as_object() {
        Some(object) if !object.is_empty() && !whole => {
            for (key, value) in object {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                value_paths(value, &path, paths);
            }
        }
        _ => paths.push(at.to_owned()),
    }
}

#[test]
fn the_readme_names_every_value() {
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(workspace_root().join(CHART).join("values.yaml")).unwrap(),
    )
    .unwrap();
    let mut paths = Vec::new();
    value_paths(&values, "", &mut paths);
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split("### Helm values")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("README has a Helm values section");
    let mut named = std::collections::BTreeSet::new();
    for row in section.lines().filter(|line| line.starts_with("| `")) {
        let first = row.split(" | ").next().unwrap();
        for name in first.split('`').skip(1).step_by(2) {
            named.insert(name.to_owned());
        }
    }
    let paths: std::collections::BTreeSet<String> = paths.into_iter().collect();
    assert_eq!(
        named, paths,
        "README's Helm values table and values.yaml differ"
    );
}
