//! The manifests in `deploy/` against the code they deploy: every
//! kustomization renders with `kubectl kustomize`, every object survives a
//! round trip through its typed k8s-openapi struct, and the names, paths,
//! ports and flags in the manifests are the ones the binaries read.
//!
//! Needs `kubectl` (with its built-in kustomize) on the PATH; nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lvmlocal_proto::{DRIVER_NAME, MediaClass, TOPOLOGY_KEY};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tower::ServiceExt;

use lvmlocal_proto::crd::DELETE_INTENT;
use lvmlocal_proto::io_limits;
use lvmlocal_proto::params::{FS_TYPE_PARAM, MEDIA_PARAM, ON_NODE_LOSS, PLACEMENT_PARAM};
use lvmlocal_proto::thin::{OVERPROVISION_PARAM, PROVISIONING_PARAM};
use lvmlocal_tests::cluster::workspace_root;
use lvmlocal_tests::manifests::{check_typed, describe, documents, one, render, same};

/// Every kustomization an operator may apply; a new overlay must be added
/// here (a test checks that none is missing).
const KUSTOMIZATIONS: [&str; 9] = [
    "deploy",
    "deploy/base",
    "deploy/overlays/extender-network-policy",
    "deploy/overlays/images",
    "deploy/overlays/monitoring",
    "deploy/overlays/namespace",
    "deploy/overlays/no-extender",
    "deploy/overlays/only-nvme",
    "deploy/overlays/snapshots",
];

const NAMESPACE: &str = "lvmlocal";

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn objects_of<T: DeserializeOwned>(objects: &[Value], kind: &str) -> Vec<T> {
    objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .map(|o| serde_json::from_value(o.clone()).unwrap())
        .collect()
}

fn pod_spec_of_daemon_set(objects: &[Value], name: &str) -> PodSpec {
    let ds: DaemonSet = one(objects, "DaemonSet", name);
    ds.spec.unwrap().template.spec.unwrap()
}

fn pod_spec_of_deployment(objects: &[Value], name: &str) -> PodSpec {
    let deployment: Deployment = one(objects, "Deployment", name);
    deployment.spec.unwrap().template.spec.unwrap()
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(container: &Container) -> Vec<String> {
    let args = container.args.clone().unwrap_or_default();
    for arg in &args {
        assert!(
            !arg.contains("$("),
            "{}: {arg}: arguments are literal here",
            container.name
        );
    }
    args
}

/// The value of `--name=value` among a sidecar's arguments.
fn flag(container: &Container, name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args(container)
        .iter()
        .find_map(|arg| arg.strip_prefix(&prefix).map(str::to_owned))
}

fn has_flag(container: &Container, name: &str) -> bool {
    let bare = format!("--{name}");
    args(container)
        .iter()
        .any(|arg| *arg == bare || arg.starts_with(&format!("{bare}=")))
}

/// The command line a container runs: its command, then its arguments.
fn command_line(container: &Container) -> Vec<String> {
    let mut line = container.command.clone().expect("an explicit command");
    line.extend(args(container));
    line
}

/// Where `container` mounts the volume `volume`.
fn mount_of(container: &Container, volume: &str) -> String {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container.name))
        .mount_path
        .clone()
}

/// The volume mounted at `path` in `container`, by name.
fn volume_at(container: &Container, path: &Path) -> String {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {}", container.name, path.display()))
        .name
        .clone()
}

/// The host path behind `path` in `container`: the hostPath volume of the
/// deepest mount holding it, joined with the rest of the path.
fn host_of(pod: &PodSpec, container: &Container, path: &Path) -> PathBuf {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&m.mount_path))
        .max_by_key(|m| Path::new(&m.mount_path).components().count())
        .unwrap_or_else(|| {
            panic!(
                "{} mounts nothing holding {}",
                container.name,
                path.display()
            )
        });
    let rest = path.strip_prefix(&mount.mount_path).unwrap();
    Path::new(&host_path(pod, &mount.name)).join(rest)
}

fn host_path(pod: &PodSpec, volume: &str) -> String {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == volume)
        .and_then(|v| v.host_path.as_ref())
        .unwrap_or_else(|| panic!("volume {volume} is not a hostPath"))
        .path
        .clone()
}

fn named_port(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{} has no port {name}", container.name))
        .container_port
}

/// The port an HTTP probe points at, resolving named ports.
fn probe_port(container: &Container, probe: &str) -> i32 {
    let probe = match probe {
        "liveness" => &container.liveness_probe,
        "readiness" => &container.readiness_probe,
        _ => &container.startup_probe,
    };
    let http = probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{} has no HTTP probe", container.name));
    match &http.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => named_port(container, name),
    }
}

/// The port of `:9740` or `0.0.0.0:9740`.
fn port_of(address: &str) -> i32 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{address} has no port"))
}

fn seconds(duration: &str) -> Duration {
    let n = duration
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{duration} is not <n>s"));
    Duration::from_secs(n)
}

fn env_field(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref())
        .map(|field| field.field_path.clone())
}

/// The snapshot.storage.k8s.io CRDs of external-snapshotter, which
/// scripts/components.sh copies beside the binaries it builds.
fn snapshot_crds() -> Vec<Value> {
    // target/components/bin/kubectl → target/components/crds/snapshot
    let kubectl = lvmlocal_tests::cluster::component("kubectl");
    let dir = kubectl.ancestors().nth(2).unwrap().join("crds/snapshot");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: scripts/components.sh copies the snapshot CRDs there",
            dir.display()
        )
    });
    let mut crds = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            crds.extend(documents(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    crds
}

/// `check_typed`, except for the snapshot.storage.k8s.io objects k8s-openapi
/// has no types for: those are checked against their CRD.
fn check_object(object: &Value) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    if api_version.starts_with("snapshot.storage.k8s.io/") {
        check_against_crd(object, &snapshot_crds());
    } else {
        check_typed(object);
    }
}

/// Fails unless `object` conforms to the schema its CRD serves for its
/// version: no field the schema lacks (the API server would prune it),
/// every required one, the schema's types and enums; its metadata must
/// survive a round trip through ObjectMeta.
fn check_against_crd(object: &Value, crds: &[Value]) {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').expect("group/version");
    let crd = crds
        .iter()
        .find(|crd| crd["spec"]["group"] == group && crd["spec"]["names"]["kind"] == object["kind"])
        .unwrap_or_else(|| panic!("{}: no CRD", describe(object)));
    let served = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version && v["served"] == true)
        .unwrap_or_else(|| panic!("{}: {api_version} is not served", describe(object)));
    if let Err(at) = conforms(object, &served["schema"]["openAPIV3Schema"], "") {
        panic!("{} does not conform to its CRD at {at}", describe(object));
    }
    let metadata: ObjectMeta = serde_json::from_value(object["metadata"].clone()).unwrap();
    let back = serde_json::to_value(metadata).unwrap();
    if let Err(at) = same(&back, &object["metadata"], ".metadata", 1) {
        panic!("{} loses metadata at {at}", describe(object));
    }
}

/// Whether `value` conforms to the OpenAPI v3 `schema` of a CRD (types,
/// enums, required and known properties); the error is where it does not.
fn conforms(value: &Value, schema: &Value, at: &str) -> Result<(), String> {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is none of {allowed:?}"));
    }
    let fits = match schema["type"].as_str() {
        Some("object") => {
            let Some(fields) = value.as_object() else {
                return Err(format!("{at}: not an object"));
            };
            for required in schema["required"].as_array().into_iter().flatten() {
                let key = required.as_str().unwrap();
                if !fields.contains_key(key) {
                    return Err(format!("{at}.{key} (required)"));
                }
            }
            // `metadata` is an object without properties in a CRD.
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, field) in fields {
                let inner = format!("{at}.{key}");
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(property), _) => conforms(field, property, &inner)?,
                    (None, Some(additional)) => conforms(field, additional, &inner)?,
                    (None, None) if properties.is_some() => {
                        return Err(format!("{inner} (not in the schema)"));
                    }
                    (None, None) => {}
                }
            }
            true
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return Err(format!("{at}: not an array"));
            };
            for (i, item) in items.iter().enumerate() {
                conforms(item, &schema["items"], &format!("{at}[{i}]"))?;
            }
            true
        }
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("boolean") => value.is_boolean(),
        _ => true,
    };
    if fits {
        Ok(())
    } else {
        Err(format!("{at}: {value} is not a {}", schema["type"]))
    }
}

#[test]
fn committed_crds_are_the_ones_the_types_generate() {
    let generated = csi_controller::crdgen::yaml().unwrap();
    let committed = read(csi_controller::crdgen::CRDS_PATH);
    assert!(
        committed == generated,
        "{} differs from what proto/src/crd.rs generates; regenerate it with\n  {}",
        csi_controller::crdgen::CRDS_PATH,
        csi_controller::crdgen::REGENERATE
    );
}

#[test]
fn every_overlay_is_tested() {
    let listed: BTreeSet<String> = KUSTOMIZATIONS
        .iter()
        .filter_map(|k| k.strip_prefix("deploy/overlays/"))
        .map(str::to_owned)
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(workspace_root().join("deploy/overlays"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present, "KUSTOMIZATIONS must name every overlay");
}

#[test]
fn every_kustomization_renders_objects_that_lose_no_field_in_their_types() {
    for dir in KUSTOMIZATIONS {
        let objects = render(dir);
        let mut seen = BTreeSet::new();
        for object in &objects {
            check_object(object);
            assert!(
                seen.insert(describe(object)),
                "{dir}: {} twice",
                describe(object)
            );
        }
    }
    // The default install is the base, unchanged.
    assert_eq!(render("deploy"), render("deploy/base"));
}

#[test]
fn examples_lose_no_field_in_their_types() {
    for example in [
        "deploy/examples/pvc-and-pod.yaml",
        "deploy/examples/statefulset-nvme.yaml",
    ] {
        for object in documents(&read(example)) {
            check_typed(&object);
        }
    }
}

#[test]
fn csi_driver_and_storage_classes_use_the_drivers_names() {
    let objects = render("deploy/base");
    let driver: CSIDriver = one(&objects, "CSIDriver", DRIVER_NAME);
    let spec = driver.spec;
    assert_eq!(spec.attach_required, Some(false));
    assert_eq!(spec.pod_info_on_mount, Some(true));
    assert_eq!(spec.storage_capacity, Some(true));
    assert_eq!(spec.fs_group_policy.as_deref(), Some("File"));
    assert_eq!(spec.volume_lifecycle_modes, Some(vec!["Persistent".into()]));

    let classes: Vec<StorageClass> = objects_of(&objects, "StorageClass");
    let mut media_seen = BTreeSet::new();
    for class in &classes {
        let name = class.metadata.name.clone().unwrap();
        assert_eq!(class.provisioner, DRIVER_NAME, "{name}");
        assert_eq!(
            class.volume_binding_mode.as_deref(),
            Some("WaitForFirstConsumer")
        );
        assert_eq!(class.reclaim_policy.as_deref(), Some("Delete"));
        assert_eq!(class.allow_volume_expansion, Some(true));
        let parameters = class.parameters.clone().unwrap();
        for key in parameters.keys() {
            assert!(
                [MEDIA_PARAM, FS_TYPE_PARAM, PLACEMENT_PARAM, ON_NODE_LOSS].contains(&key.as_str()),
                "{name}: csi-controller refuses parameter {key}"
            );
        }
        let media: MediaClass = parameters[MEDIA_PARAM].parse().unwrap();
        assert_eq!(name, format!("lvmlocal-{media}"));
        let fs: lvmlocal_proto::volume::FsType = parameters[FS_TYPE_PARAM].parse().unwrap();
        assert!(!fs.to_string().is_empty());
        media_seen.insert(media.to_string());
    }
    assert_eq!(media_seen, ["hdd", "nvme", "ssd"].map(str::to_owned).into());

    // The CRDs of the render are the generated ones.
    let mut crds: Vec<CustomResourceDefinition> = objects_of(&objects, "CustomResourceDefinition");
    let mut generated = csi_controller::crdgen::crds();
    let key = |crd: &CustomResourceDefinition| crd.metadata.name.clone();
    crds.sort_by_key(key);
    generated.sort_by_key(key);
    assert_eq!(crds, generated);
    for crd in &crds {
        assert_eq!(crd.spec.group, DRIVER_NAME);
    }
    // The topology key the agent reports is the driver's own: the
    // provisioner's --strict-topology relies on kubelet's CSINode keys.
    assert!(TOPOLOGY_KEY.starts_with(&format!("{DRIVER_NAME}/")));
}

#[test]
fn agent_daemon_set_matches_the_agent() {
    let objects = render("deploy/base");
    let pod = pod_spec_of_daemon_set(&objects, "lvmlocal-agent");
    let agent = container(&pod, "agent");
    let liveness = container(&pod, "liveness-probe");
    // The agent registers the driver with kubelet itself: no
    // node-driver-registrar runs beside it, and every volume is used.
    let names: BTreeSet<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["agent", "liveness-probe"].into());
    for volume in pod.volumes.iter().flatten() {
        assert!(
            pod.containers
                .iter()
                .flat_map(|c| c.volume_mounts.iter().flatten())
                .any(|m| m.name == volume.name),
            "volume {} is mounted by no container",
            volume.name
        );
    }

    let line = command_line(agent);
    assert_eq!(line[0], "csi-agent");
    let parsed = csi_agent::Args::try_parse_from(&line).unwrap();
    assert!(parsed.command.is_none(), "the DaemonSet serves");
    assert!(!parsed.standalone, "the cluster agent reports to the API");
    assert_eq!(
        env_field(agent, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );

    // The socket: the agent's endpoint, the sidecar's address, and the host
    // path kubelet is told about, all the same file.
    let socket = lvmlocal_proto::server::socket_path(&parsed.csi_endpoint).unwrap();
    let socket_dir = socket.parent().unwrap();
    let plugin_dir = volume_at(agent, socket_dir);
    let host_dir = host_path(&pod, &plugin_dir);
    assert_eq!(
        Path::new(&host_dir),
        Path::new(&parsed.kubelet_dir)
            .join("plugins")
            .join(DRIVER_NAME)
    );
    assert_eq!(
        flag(liveness, "csi-address").map(PathBuf::from).as_ref(),
        Some(&socket)
    );
    assert_eq!(
        mount_of(liveness, &plugin_dir),
        socket_dir.to_str().unwrap()
    );
    let registration_path = parsed
        .kubelet_registration_path
        .clone()
        .expect("--kubelet-registration-path: the agent registers with kubelet");
    assert_eq!(
        registration_path,
        Path::new(&host_dir).join(socket.file_name().unwrap())
    );
    assert_eq!(host_of(&pod, agent, &socket), registration_path);
    // The agent's registration socket lands in the host's plugins_registry/,
    // where kubelet looks for plugins.
    let registration_socket = csi_agent::kubelet_registration::socket_path(&parsed.kubelet_dir);
    assert_eq!(
        host_of(&pod, agent, &registration_socket).parent(),
        Some(
            Path::new(&parsed.kubelet_dir)
                .join("plugins_registry")
                .as_path()
        )
    );

    // kubelet's directory at the same path inside, mounts flowing back.
    let kubelet = volume_at(agent, &parsed.kubelet_dir);
    assert_eq!(Path::new(&host_path(&pod, &kubelet)), parsed.kubelet_dir);
    let propagation = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == kubelet)
        .and_then(|m| m.mount_propagation.clone());
    assert_eq!(propagation.as_deref(), Some("Bidirectional"));

    // What lvm2, blkid and udev need, at the host's own paths.
    for path in [
        "/dev",
        "/sys",
        "/run/udev",
        "/run/lvm",
        "/run/lock/lvm",
        "/etc/lvm",
    ] {
        let volume = volume_at(agent, Path::new(path));
        assert_eq!(host_path(&pod, &volume), path);
    }
    let privileged = agent.security_context.as_ref().and_then(|s| s.privileged);
    assert_eq!(privileged, Some(true));
    assert_eq!(
        pod.host_network,
        Some(true),
        "uevents need the host network"
    );
    assert_eq!(pod.host_ipc, Some(true), "udev cookies need the host IPC");
    // The host's udev manages the device nodes: see the README.
    assert!(
        agent
            .env
            .iter()
            .flatten()
            .all(|e| e.name != "DM_DISABLE_UDEV"),
        "the agent must wait for the host's udev, not race it"
    );

    // Ports on the host network: the agent's metrics and the sidecar's
    // health endpoint, each where its probe looks, none on 9808.
    let metrics = i32::from(parsed.metrics_address.port());
    assert_eq!(named_port(agent, "metrics"), metrics);
    assert_eq!(probe_port(agent, "readiness"), metrics);
    let probe_sidecar = port_of(&flag(liveness, "http-endpoint").unwrap());
    assert_eq!(probe_port(agent, "liveness"), probe_sidecar);
    let ports: BTreeSet<i32> = [metrics, probe_sidecar].into();
    assert_eq!(ports.len(), 2, "host ports collide: {ports:?}");
    assert!(
        !ports.contains(&9808),
        "9808 is every livenessprobe's default"
    );

    // The configuration file comes from the ConfigMap and is one the agent
    // accepts.
    let config = parsed.discovery.config.clone().expect("--config");
    let config_volume = volume_at(agent, config.parent().unwrap());
    let config_map_name = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == config_volume)
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.clone())
        .expect("the config volume is a ConfigMap");
    let config_map: ConfigMap = one(&objects, "ConfigMap", &config_map_name);
    let file = config.file_name().unwrap().to_str().unwrap();
    let text = &config_map.data.unwrap()[file];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), text).unwrap();
    let discovery = csi_agent::DiscoveryArgs {
        config: Some(dir.path().join(file)),
        ..parsed.discovery.clone()
    };
    let resolved = discovery.resolve().unwrap();
    // As shipped, no node's disks are claimed until the operator labels it,
    // and a control plane's not even then.
    assert!(
        !resolved.claim_disks,
        "claim_disks on every node by default"
    );
    assert!(!resolved.claim_control_plane);
}

#[test]
fn controller_deployment_matches_the_controller() {
    let objects = render("deploy/base");
    let pod = pod_spec_of_deployment(&objects, "lvmlocal-controller");
    let controller = container(&pod, "controller");
    let provisioner = container(&pod, "csi-provisioner");
    let resizer = container(&pod, "csi-resizer");

    let line = command_line(controller);
    assert_eq!(line[0], "csi-controller");
    let parsed = csi_controller::Args::try_parse_from(&line).unwrap();
    assert!(parsed.command.is_none());

    let socket = lvmlocal_proto::server::socket_path(&parsed.csi_endpoint).unwrap();
    let socket_dir = volume_at(controller, socket.parent().unwrap());
    for sidecar in [provisioner, resizer] {
        assert_eq!(
            flag(sidecar, "csi-address").map(PathBuf::from).as_ref(),
            Some(&socket),
            "{}",
            sidecar.name
        );
        assert_eq!(
            mount_of(sidecar, &socket_dir),
            socket.parent().unwrap().to_str().unwrap()
        );
        // Both sidecars elect a leader too; see the README.
        assert!(has_flag(sidecar, "leader-election"), "{}", sidecar.name);
        // The controller gives up waiting for the agent before the sidecar
        // gives up on the controller.
        let timeout = seconds(&flag(sidecar, "timeout").expect("--timeout"));
        assert!(
            Duration::from_secs(parsed.volume_wait_seconds) < timeout,
            "{}: --volume-wait-seconds must stay below --timeout",
            sidecar.name
        );
    }

    for required in [
        "strict-topology",
        "extra-create-metadata",
        "enable-capacity",
        "leader-election",
    ] {
        assert!(has_flag(provisioner, required), "--{required}");
    }
    // Topology and VolumeAttributesClass are GA: the sidecars take no gates.
    for sidecar in [provisioner, resizer] {
        assert_eq!(flag(sidecar, "feature-gates"), None, "{}", sidecar.name);
    }
    assert_eq!(
        flag(provisioner, "capacity-ownerref-level").as_deref(),
        Some("2")
    );
    // --enable-capacity names its objects' owner from these.
    assert_eq!(
        env_field(provisioner, "NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(
        env_field(provisioner, "POD_NAME").as_deref(),
        Some("metadata.name")
    );

    // The controller's own Lease: on, in the pod's namespace, named by pod.
    assert!(parsed.leader_election);
    assert_eq!(
        env_field(controller, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(
        env_field(controller, "POD_NAME").as_deref(),
        Some("metadata.name")
    );
    let metrics = i32::from(parsed.metrics_address.port());
    assert_eq!(named_port(controller, "metrics"), metrics);
    assert_eq!(probe_port(controller, "liveness"), metrics);
    let deployment: Deployment = one(&objects, "Deployment", "lvmlocal-controller");
    assert!(deployment.spec.unwrap().replicas.unwrap() >= 1);
}

/// The sidecar releases deploy/ names are those the cluster tests run.
#[test]
fn sidecar_images_are_the_tested_releases() {
    let versions = std::fs::read_to_string(workspace_root().join("scripts/versions.env")).unwrap();
    let version = |key: &str| {
        versions
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("scripts/versions.env has no {key}"))
            .to_string()
    };
    let objects = render("deploy/base");
    let pod = pod_spec_of_deployment(&objects, "lvmlocal-controller");
    for (name, key) in [
        ("csi-provisioner", "CSI_PROVISIONER"),
        ("csi-resizer", "CSI_RESIZER"),
    ] {
        let image = container(&pod, name).image.clone().unwrap();
        assert_eq!(
            image,
            format!("registry.k8s.io/sig-storage/{name}:{}", version(key))
        );
    }
    // csi-snapshotter runs with the snapshots component only.
    let objects = render("deploy/overlays/snapshots");
    let pod = pod_spec_of_deployment(&objects, "lvmlocal-controller");
    let image = container(&pod, "csi-snapshotter").image.clone().unwrap();
    assert_eq!(
        image,
        format!(
            "registry.k8s.io/sig-storage/csi-snapshotter:{}",
            version("CSI_SNAPSHOTTER")
        )
    );
}

#[tokio::test]
async fn scheduler_wiring_matches_the_extender() {
    let objects = render("deploy/base");
    let pod = pod_spec_of_deployment(&objects, "lvmlocal-scheduler");
    let scheduler = container(&pod, "scheduler");
    let line = command_line(scheduler);
    assert_eq!(line[0], "csi-scheduler");
    let parsed = csi_scheduler::Args::try_parse_from(&line).unwrap();
    // The heartbeat Leases it watches are in its own namespace.
    assert_eq!(
        env_field(scheduler, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    let listen = i32::from(parsed.listen.port());
    assert_eq!(named_port(scheduler, "http"), listen);
    for probe in ["liveness", "readiness", "startup"] {
        assert_eq!(probe_port(scheduler, probe), listen, "{probe}");
    }

    let service: Service = one(&objects, "Service", "lvmlocal-scheduler");
    let service_port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(
        service_port.target_port,
        Some(IntOrString::String("http".into()))
    );

    // The kube-scheduler side: the extender stanza points at the Service's
    // port and at the routes csi-scheduler serves.
    let config = documents(&read("deploy/scheduler/kube-scheduler-config.yaml"));
    assert_eq!(config.len(), 1);
    let config = &config[0];
    assert_eq!(config["apiVersion"], "kubescheduler.config.k8s.io/v1");
    assert_eq!(config["kind"], "KubeSchedulerConfiguration");
    let extenders = config["extenders"].as_array().unwrap();
    assert_eq!(extenders.len(), 1);
    let extender = &extenders[0];
    let url = extender["urlPrefix"].as_str().unwrap();
    let rest = url
        .strip_prefix("http://")
        .expect("plain HTTP in the cluster");
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    assert_eq!(port_of(authority), service_port.port);
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    assert_eq!(path, parsed.path_prefix);
    assert_eq!(extender["nodeCacheCapable"], true);
    assert_eq!(extender["ignorable"], true);
    assert!(extender["weight"].as_i64().unwrap() > 0);
    assert!(seconds(extender["httpTimeout"].as_str().unwrap()) > Duration::ZERO);
    assert!(extender.get("managedResources").is_none());

    let policy = csi_scheduler::extender::Policy {
        default_placement: parsed.default_placement,
        reservation_ttl: Duration::from_secs(parsed.reservation_ttl_seconds),
        max_reservations: parsed.max_reservations,
    };
    let app = csi_scheduler::http::router(
        Arc::new(csi_scheduler::extender::Extender::new(
            policy,
            csi_scheduler::metrics::Metrics::new(),
        )),
        &parsed.path_prefix,
        parsed.max_request_bytes,
    );
    for verb in ["filterVerb", "prioritizeVerb"] {
        let uri = format!("{path}/{}", extender[verb].as_str().unwrap());
        let request = Request::post(&uri)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let status = app.clone().oneshot(request).await.unwrap().status();
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "kube-scheduler would POST {uri} and get {status}"
        );
    }
    let request = Request::get("/healthz").body(Body::empty()).unwrap();
    let status = app.oneshot(request).await.unwrap().status();
    assert_ne!(status, StatusCode::NOT_FOUND, "the probes' /healthz");
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verbs: &[&str]) -> bool {
    verbs.iter().all(|verb| {
        rules.iter().any(|rule| {
            rule.api_groups.iter().flatten().any(|g| g == group)
                && rule.resources.iter().flatten().any(|r| r == resource)
                && rule.verbs.iter().any(|v| v == verb)
        })
    })
}

#[test]
fn rbac_grants_what_the_code_calls_and_no_wildcards() {
    let objects = render("deploy/base");
    let cluster_role = |name: &str| -> Vec<PolicyRule> {
        one::<ClusterRole>(&objects, "ClusterRole", name)
            .rules
            .unwrap()
    };

    let agent = cluster_role("lvmlocal-agent");
    assert!(allows(
        &agent,
        "lvmlocal.io",
        "nodelocalstorages",
        &["create", "patch"]
    ));
    assert!(allows(
        &agent,
        "lvmlocal.io",
        "nodelocalstorages/status",
        &["patch"]
    ));
    assert!(allows(
        &agent,
        "lvmlocal.io",
        "logicalvolumes",
        &["list", "watch", "patch"]
    ));
    assert!(allows(
        &agent,
        "lvmlocal.io",
        "logicalvolumes/status",
        &["patch"]
    ));
    assert!(allows(
        &agent,
        "events.k8s.io",
        "events",
        &["create", "patch"]
    ));
    assert!(allows(&agent, "", "persistentvolumes", &["list"]));
    assert!(!allows(&agent, "", "persistentvolumes", &["watch"]));
    assert!(allows(&agent, "", "nodes", &["get", "list", "watch"]));
    assert!(!allows(&agent, "", "nodes", &["patch"]));
    assert!(!allows(
        &agent,
        "lvmlocal.io",
        "logicalvolumes",
        &["create"]
    ));
    assert!(!allows(
        &agent,
        "lvmlocal.io",
        "logicalvolumes",
        &["delete"]
    ));

    let controller = cluster_role("lvmlocal-controller");
    assert!(allows(
        &controller,
        "lvmlocal.io",
        "logicalvolumes",
        &["get", "list", "watch", "create", "delete", "patch"]
    ));
    assert!(allows(
        &controller,
        "lvmlocal.io",
        "nodelocalstorages",
        &["list", "watch"]
    ));
    assert!(allows(&controller, "", "nodes", &["list", "watch"]));
    assert!(!allows(
        &controller,
        "lvmlocal.io",
        "logicalvolumes/status",
        &["patch"]
    ));
    let role: Role = one(&objects, "Role", "lvmlocal-controller");
    let role = role.rules.unwrap();
    assert!(allows(
        &role,
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"]
    ));
    assert!(allows(
        &role,
        "storage.k8s.io",
        "csistoragecapacities",
        &["create", "update", "delete"]
    ));
    assert!(allows(&role, "apps", "replicasets", &["get"]));

    let scheduler = cluster_role("lvmlocal-scheduler");
    for (group, resource) in [
        ("lvmlocal.io", "nodelocalstorages"),
        ("lvmlocal.io", "logicalvolumes"),
        ("", "persistentvolumeclaims"),
        ("storage.k8s.io", "storageclasses"),
    ] {
        assert!(
            allows(&scheduler, group, resource, &["list", "watch"]),
            "{resource}"
        );
    }
    assert!(
        scheduler
            .iter()
            .all(|r| r.verbs.iter().all(|v| v == "list" || v == "watch"))
    );
    // The agents' heartbeat Leases, read in the driver's namespace only.
    let role: Role = one(&objects, "Role", "lvmlocal-scheduler");
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    let role = role.rules.unwrap();
    assert!(allows(
        &role,
        "coordination.k8s.io",
        "leases",
        &["list", "watch"]
    ));
    assert!(!allows(&role, "coordination.k8s.io", "leases", &["update"]));
    let binding: RoleBinding = one(&objects, "RoleBinding", "lvmlocal-scheduler");
    assert_eq!(
        (
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        ("Role", "lvmlocal-scheduler")
    );
    assert!(binding.subjects.iter().flatten().any(|s| {
        s.kind == "ServiceAccount"
            && s.name == "lvmlocal-scheduler"
            && s.namespace.as_deref() == Some(NAMESPACE)
    }));

    assert_no_wildcards(&objects);

    // Each workload runs as its own ServiceAccount, and that account is
    // bound to its role.
    let bindings: Vec<ClusterRoleBinding> = objects_of(&objects, "ClusterRoleBinding");
    let accounts: BTreeSet<String> = objects_of::<ServiceAccount>(&objects, "ServiceAccount")
        .into_iter()
        .map(|sa| sa.metadata.name.unwrap())
        .collect();
    let mut used = BTreeSet::new();
    for (kind, name) in [
        ("DaemonSet", "lvmlocal-agent"),
        ("Deployment", "lvmlocal-controller"),
        ("Deployment", "lvmlocal-scheduler"),
    ] {
        let pod = match kind {
            "DaemonSet" => pod_spec_of_daemon_set(&objects, name),
            _ => pod_spec_of_deployment(&objects, name),
        };
        let account = pod.service_account_name.unwrap();
        assert!(accounts.contains(&account), "{account}");
        assert!(used.insert(account.clone()), "{account} shared");
        assert!(bindings.iter().any(|b| {
            b.role_ref.name == account
                && b.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == account
                        && s.namespace.as_deref() == Some(NAMESPACE)
                })
        }));
    }
}

/// No ClusterRole or Role grants `*` of verbs, resources or groups.
fn assert_no_wildcards(objects: &[Value]) {
    let roles = objects_of::<ClusterRole>(objects, "ClusterRole")
        .into_iter()
        .map(|role| (role.metadata.name, role.rules))
        .chain(
            objects_of::<Role>(objects, "Role")
                .into_iter()
                .map(|role| (role.metadata.name, role.rules)),
        );
    for (name, rules) in roles {
        for rule in rules.into_iter().flatten() {
            for word in rule
                .verbs
                .iter()
                .chain(rule.resources.iter().flatten())
                .chain(rule.api_groups.iter().flatten())
            {
                assert_ne!(word, "*", "{name:?}");
            }
        }
    }
}

/// The rules of every ClusterRole bound to the ServiceAccount `account` of
/// the driver's namespace.
fn cluster_rules_of(objects: &[Value], account: &str) -> Vec<PolicyRule> {
    let bound: BTreeSet<String> = objects_of::<ClusterRoleBinding>(objects, "ClusterRoleBinding")
        .into_iter()
        .filter(|binding| {
            binding.role_ref.kind == "ClusterRole"
                && binding.subjects.iter().flatten().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == account
                        && s.namespace.as_deref() == Some(NAMESPACE)
                })
        })
        .map(|binding| binding.role_ref.name)
        .collect();
    objects_of::<ClusterRole>(objects, "ClusterRole")
        .into_iter()
        .filter(|role| bound.contains(role.metadata.name.as_deref().unwrap_or_default()))
        .flat_map(|role| role.rules.unwrap_or_default())
        .collect()
}

/// The snapshots component: csi-snapshotter beside csi-controller as the
/// other sidecars are, sending what csi-controller reads, under RBAC that
/// covers its calls, and a VolumeSnapshotClass of the driver.
#[test]
fn snapshots_component_wires_csi_snapshotter() {
    let objects = render("deploy/overlays/snapshots");
    let pod = pod_spec_of_deployment(&objects, "lvmlocal-controller");
    let controller = container(&pod, "controller");
    let snapshotter = container(&pod, "csi-snapshotter");
    let parsed = csi_controller::Args::try_parse_from(command_line(controller)).unwrap();

    // The same socket, leader election and timeout as the other sidecars.
    let socket = lvmlocal_proto::server::socket_path(&parsed.csi_endpoint).unwrap();
    let socket_dir = volume_at(controller, socket.parent().unwrap());
    assert_eq!(
        flag(snapshotter, "csi-address").map(PathBuf::from).as_ref(),
        Some(&socket)
    );
    assert_eq!(
        mount_of(snapshotter, &socket_dir),
        socket.parent().unwrap().to_str().unwrap()
    );
    assert!(has_flag(snapshotter, "leader-election"));
    let timeout = seconds(&flag(snapshotter, "timeout").expect("--timeout"));
    assert!(
        Duration::from_secs(parsed.volume_wait_seconds) < timeout,
        "--volume-wait-seconds must stay below csi-snapshotter's --timeout"
    );
    // csi-controller reads the VolumeSnapshot's namespace and name from
    // CreateSnapshot's parameters csi.storage.k8s.io/volumesnapshot/name
    // and .../namespace, which the sidecar sends only with this flag.
    assert!(has_flag(snapshotter, "extra-create-metadata"));
    // One sidecar for the cluster, not one per node (which would refuse
    // --leader-election).
    assert!(!has_flag(snapshotter, "node-deployment"));
    assert_eq!(flag(snapshotter, "feature-gates"), None);
    // Its metrics on a port of its own, named for a PodMonitor.
    let port = port_of(&flag(snapshotter, "http-endpoint").expect("--http-endpoint"));
    assert_eq!(named_port(snapshotter, "snapshotter"), port);
    let ports: Vec<i32> = pod
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| p.container_port)
        .collect();
    assert_eq!(
        ports.len(),
        ports.iter().collect::<BTreeSet<_>>().len(),
        "ports collide: {ports:?}"
    );
    // Appended: csi-controller stays the pod's first container.
    assert_eq!(pod.containers[0].name, "controller");
    assert_eq!(
        pod.containers.last().map(|c| c.name.as_str()),
        Some("csi-snapshotter")
    );
    let provisioner = container(&pod, "csi-provisioner");
    assert_eq!(snapshotter.security_context, provisioner.security_context);
    assert_eq!(snapshotter.image_pull_policy, provisioner.image_pull_policy);

    // RBAC: what csi-snapshotter calls, from the ClusterRoles bound to the
    // pod's ServiceAccount, and its leader-election Lease from the Role.
    let account = pod.service_account_name.clone().unwrap();
    let rules = cluster_rules_of(&objects, &account);
    let snapshots = "snapshot.storage.k8s.io";
    for (group, resource, verbs) in [
        (
            snapshots,
            "volumesnapshotcontents",
            &["get", "list", "watch", "update", "patch"][..],
        ),
        (
            snapshots,
            "volumesnapshotcontents/status",
            &["update", "patch"],
        ),
        (
            snapshots,
            "volumesnapshotclasses",
            &["get", "list", "watch"],
        ),
        ("", "events", &["create", "patch"]),
        // csi-provisioner, for a claim restored from a VolumeSnapshot.
        (
            snapshots,
            "volumesnapshots",
            &["get", "list", "watch", "update"],
        ),
    ] {
        assert!(
            allows(&rules, group, resource, verbs),
            "{account} may not {verbs:?} {resource}"
        );
    }
    let role: Role = one(&objects, "Role", "lvmlocal-controller");
    assert!(allows(
        &role.rules.unwrap(),
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"]
    ));
    // The snapshot-controller makes and binds the contents, not the sidecar.
    assert!(!allows(
        &rules,
        snapshots,
        "volumesnapshotcontents",
        &["create"]
    ));
    assert!(!allows(
        &rules,
        snapshots,
        "volumesnapshotcontents",
        &["delete"]
    ));
    assert_no_wildcards(&objects);
    // Every snapshot resource granted is one the CRDs serve.
    let crds = snapshot_crds();
    for rule in rules
        .iter()
        .filter(|r| r.api_groups.iter().flatten().any(|g| g == snapshots))
    {
        for resource in rule.resources.iter().flatten() {
            let (plural, subresource) = resource
                .split_once('/')
                .map_or((resource.as_str(), None), |(p, s)| (p, Some(s)));
            let crd = crds
                .iter()
                .find(|crd| {
                    crd["spec"]["group"] == snapshots && crd["spec"]["names"]["plural"] == plural
                })
                .unwrap_or_else(|| panic!("no CRD serves {resource}"));
            if let Some(subresource) = subresource {
                let versions = crd["spec"]["versions"].as_array().unwrap();
                assert!(
                    versions
                        .iter()
                        .any(|v| v["subresources"].get(subresource).is_some()),
                    "{plural} has no {subresource} subresource"
                );
            }
        }
    }

    // The class: the driver's, deleting its snapshots with the
    // VolumeSnapshots, with no csi.storage.k8s.io/ parameter (the sidecar
    // refuses those it does not know).
    let class = named(&objects, "VolumeSnapshotClass", "lvmlocal");
    check_against_crd(class, &crds);
    assert_eq!(class["driver"], DRIVER_NAME);
    assert_eq!(class["deletionPolicy"], "Delete");
    for key in class["parameters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        assert!(!key.starts_with("csi.storage.k8s.io/"), "{key}");
    }
}

/// Image references of every container in the render.
fn images(objects: &[Value]) -> Vec<String> {
    let mut images = Vec::new();
    for object in objects {
        let spec = &object["spec"]["template"]["spec"];
        for container in spec["containers"].as_array().into_iter().flatten() {
            images.push(container["image"].as_str().unwrap().to_owned());
        }
    }
    images
}

/// The workloads that run lvmlocal's own binaries: kind, name, and the
/// component, which names the container, the Dockerfile stage, the image
/// (`lvmlocal-<component>`) and the binary (`csi-<component>`).
const COMPONENTS: [(&str, &str, &str); 3] = [
    ("DaemonSet", "lvmlocal-agent", "agent"),
    ("Deployment", "lvmlocal-controller", "controller"),
    ("Deployment", "lvmlocal-scheduler", "scheduler"),
];

/// The tools the agent calls, as Debian packages.
const AGENT_PACKAGES: [&str; 6] = [
    "lvm2",
    "util-linux",
    "mount",
    "e2fsprogs",
    "xfsprogs",
    "thin-provisioning-tools",
];

/// The container of a component in a render.
fn component_container(objects: &[Value], kind: &str, name: &str, component: &str) -> Container {
    let pod = match kind {
        "DaemonSet" => pod_spec_of_daemon_set(objects, name),
        _ => pod_spec_of_deployment(objects, name),
    };
    container(&pod, component).clone()
}

/// The named stages of a Dockerfile (`FROM <image> AS <name>`), each with
/// the text of its instructions up to the next `FROM`; comments are left out.
fn stages(dockerfile: &str) -> BTreeMap<String, String> {
    let mut stages = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in dockerfile.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = trimmed.split_whitespace().collect();
        if words
            .first()
            .is_some_and(|w| w.eq_ignore_ascii_case("FROM"))
        {
            current = words
                .iter()
                .position(|w| w.eq_ignore_ascii_case("AS"))
                .and_then(|at| words.get(at + 1))
                .map(|name| name.to_string());
            if let Some(name) = &current {
                assert!(
                    stages.insert(name.clone(), String::new()).is_none(),
                    "Dockerfile: stage {name} twice"
                );
            }
            continue;
        }
        if let Some(name) = &current {
            let text = stages.get_mut(name).unwrap();
            text.push_str(line);
            text.push('\n');
        }
    }
    stages
}

#[test]
fn images_are_pinned_and_the_binaries_exist() {
    let version = env!("CARGO_PKG_VERSION");
    let objects = render("deploy/base");

    // Each component runs its own image, at the crate's version; the
    // sidecars are pinned releases; nothing else is pulled.
    let own: BTreeSet<String> = COMPONENTS
        .iter()
        .map(|(_, _, component)| format!("lvmlocal-{component}:{version}"))
        .collect();
    for image in images(&objects) {
        let (_, tag) = image.rsplit_once(':').expect("a tag");
        assert_ne!(tag, "latest", "{image}");
        if image.starts_with("registry.k8s.io/sig-storage/") {
            assert!(tag.starts_with('v'), "{image}");
        } else {
            assert!(own.contains(&image), "{image} is none of {own:?}");
        }
    }

    // The Dockerfile builds every binary the manifests run, and has one
    // stage per component that ships it; only the agent's carries the tools
    // it calls.
    let dockerfile = read("Dockerfile");
    let stages = stages(&dockerfile);
    for (kind, name, component) in COMPONENTS {
        let container = component_container(&objects, kind, name, component);
        assert_eq!(
            container.image.as_deref(),
            Some(format!("lvmlocal-{component}:{version}").as_str()),
            "{kind} {name}"
        );
        let binary = format!("csi-{component}");
        assert_eq!(command_line(&container)[0], binary, "{kind} {name}");
        assert!(dockerfile.contains(&format!("-p {binary}")), "{binary}");
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "{binary}"
        );
        let stage = stages.get(component).unwrap_or_else(|| {
            panic!(
                "the Dockerfile has no stage `FROM ... AS {component}` (its stages: {:?})",
                stages.keys().collect::<Vec<_>>()
            )
        });
        assert!(
            stage.contains(&format!("/out/{binary}")),
            "stage {component} does not copy {binary}:\n{stage}"
        );
        for package in AGENT_PACKAGES {
            let installed = stage.split_whitespace().any(|word| word == package);
            assert_eq!(
                installed,
                component == "agent",
                "stage {component} and package {package}"
            );
        }
    }
}

#[test]
fn overlays_make_their_one_change() {
    let base = render("deploy/base");
    let names = |objects: &[Value]| -> BTreeSet<String> { objects.iter().map(describe).collect() };

    // No extender: exactly the scheduler's objects are gone.
    let no_extender = render("deploy/overlays/no-extender");
    let gone: BTreeSet<String> = names(&base)
        .difference(&names(&no_extender))
        .cloned()
        .collect();
    assert_eq!(
        gone,
        [
            "ClusterRole -/lvmlocal-scheduler",
            "ClusterRoleBinding -/lvmlocal-scheduler",
            "Deployment lvmlocal/lvmlocal-scheduler",
            "Role lvmlocal/lvmlocal-scheduler",
            "RoleBinding lvmlocal/lvmlocal-scheduler",
            "Service lvmlocal/lvmlocal-scheduler",
            "ServiceAccount lvmlocal/lvmlocal-scheduler",
        ]
        .map(str::to_owned)
        .into()
    );
    assert!(names(&no_extender).is_subset(&names(&base)));

    // Only NVMe: one StorageClass, and an agent that manages only NVMe.
    let only_nvme = render("deploy/overlays/only-nvme");
    let classes: Vec<StorageClass> = objects_of(&only_nvme, "StorageClass");
    assert_eq!(classes.len(), 1);
    assert_eq!(classes[0].metadata.name.as_deref(), Some("lvmlocal-nvme"));
    let pod = pod_spec_of_daemon_set(&only_nvme, "lvmlocal-agent");
    let parsed = csi_agent::Args::try_parse_from(command_line(container(&pod, "agent"))).unwrap();
    assert_eq!(parsed.discovery.classes, Some(vec![MediaClass::Nvme]));

    // Another namespace: every namespaced object and every subject moves.
    let moved = render("deploy/overlays/namespace");
    let text = serde_json::to_string(&moved).unwrap();
    assert!(!text.contains(&format!("\"namespace\":\"{NAMESPACE}\"")));
    let namespaces: Vec<Namespace> = objects_of(&moved, "Namespace");
    assert_eq!(namespaces.len(), 1);
    assert_eq!(
        namespaces[0].metadata.name.as_deref(),
        Some("storage-system")
    );
    assert_eq!(names(&moved).len(), names(&base).len());

    // Images: every image comes from the other registry, each component's
    // from its own repository there.
    let elsewhere = render("deploy/overlays/images");
    for image in images(&elsewhere) {
        assert!(image.starts_with("registry.example.com/"), "{image}");
    }
    for (kind, name, component) in COMPONENTS {
        let container = component_container(&elsewhere, kind, name, component);
        assert_eq!(
            container.image,
            Some(format!(
                "registry.example.com/storage/lvmlocal-{component}:{}",
                env!("CARGO_PKG_VERSION")
            )),
            "{kind} {name}"
        );
    }

    // Snapshots: the RBAC and the class are added and csi-snapshotter is
    // appended to the controller pod; every other object is the base's.
    let snapshots = render("deploy/overlays/snapshots");
    let added: BTreeSet<String> = names(&snapshots)
        .difference(&names(&base))
        .cloned()
        .collect();
    assert_eq!(
        added,
        [
            "ClusterRole -/lvmlocal-controller-snapshots",
            "ClusterRoleBinding -/lvmlocal-controller-snapshots",
            "VolumeSnapshotClass -/lvmlocal",
        ]
        .map(str::to_owned)
        .into()
    );
    assert!(names(&base).is_subset(&names(&snapshots)));
    for object in &base {
        let mut other = snapshots
            .iter()
            .find(|o| describe(o) == describe(object))
            .unwrap()
            .clone();
        if describe(object) == "Deployment lvmlocal/lvmlocal-controller" {
            let containers = other["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .unwrap();
            let appended = containers.pop().unwrap();
            assert_eq!(appended["name"], "csi-snapshotter");
        }
        assert_eq!(&other, object, "{}", describe(object));
    }
}

/// Sample names a Prometheus scrape of `text` (the text format) yields.
fn sample_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["bucket", "sum", "count"] {
                    names.insert(format!("{name}_{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Every sample name the three components export. A metric family shows
/// up in the text only once it has a sample, so each gets one first.
async fn metric_names_of_the_code() -> BTreeSet<String> {
    let rpc = lvmlocal_proto::rpc::RpcMetrics::default();
    let answered = rpc
        .observe("Probe", async { Ok::<_, tonic::Status>(()) })
        .await;
    assert!(answered.is_ok());
    let mut controller = prometheus_client::registry::Registry::with_prefix("lvmlocal");
    rpc.register(&mut controller);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &controller).unwrap();

    let agent = csi_agent::metrics::Metrics::new(&rpc);
    agent.observe(&one_volume_group(), Duration::from_millis(1));
    agent.reconcile_failed("NotEnoughSpace");
    agent.media_load(&lvmlocal_proto::crd::NodeLoad {
        nvme: Some(lvmlocal_proto::load::measure(MediaClass::Nvme, 0.5, 1.0)),
        ..Default::default()
    });
    text.push_str(&agent.encode());

    let scheduler = csi_scheduler::metrics::Metrics::new();
    scheduler.request(
        csi_scheduler::metrics::RequestLabels {
            verb: "filter",
            outcome: "ok",
        },
        Duration::from_millis(1),
    );
    scheduler.filtered("insufficient_space", 1);
    scheduler.watch_error("PersistentVolumeClaim");
    text.push_str(&scheduler.encode());
    sample_names(&text)
}

/// An inventory of one disk in one NVMe volume group.
fn one_volume_group() -> csi_agent::inventory::Inventory {
    use csi_agent::discovery::{Disk, Verdict};
    use csi_agent::plan::{GroupState, LvmState, Plan, Vg};
    let vg = "lvmlocal-nvme".to_owned();
    csi_agent::inventory::Inventory {
        disks: vec![Disk {
            name: "nvme0n1".into(),
            slot: None,
            media: Some(MediaClass::Nvme),
            size_bytes: 1 << 30,
            serial: None,
            model: None,
            verdict: Verdict::Member { vg: vg.clone() },
        }],
        lvm: LvmState {
            pvs: Vec::new(),
            vgs: vec![Vg {
                name: vg.clone(),
                tags: Vec::new(),
                size_bytes: 1 << 30,
                free_bytes: 1 << 29,
                extent_bytes: 4 << 20,
                missing_pvs: 0,
            }],
        },
        plan: Plan {
            groups: vec![GroupState {
                media: MediaClass::Nvme,
                vg,
                exists: true,
                missing_pvs: 0,
                blocked: None,
            }],
            actions: Vec::new(),
        },
    }
}

#[tokio::test]
async fn monitoring_scrapes_real_ports_and_charts_real_metrics() {
    let objects = render("deploy/overlays/monitoring");

    // Each PodMonitor endpoint is a named port of the pods it selects; the
    // ServiceMonitor's is a named port of the Service.
    for monitor in objects.iter().filter(|o| o["kind"] == "PodMonitor") {
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        let workload = objects
            .iter()
            .find(|o| {
                matches!(o["kind"].as_str(), Some("DaemonSet" | "Deployment"))
                    && selects(selector, &o["spec"]["template"]["metadata"]["labels"])
            })
            .unwrap_or_else(|| panic!("{} selects no workload", describe(monitor)));
        let containers = workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        for endpoint in monitor["spec"]["podMetricsEndpoints"].as_array().unwrap() {
            let port = &endpoint["port"];
            assert!(
                containers
                    .iter()
                    .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                    .any(|p| p["name"] == *port),
                "{}: no port {port}",
                describe(monitor)
            );
        }
    }
    for monitor in objects.iter().filter(|o| o["kind"] == "ServiceMonitor") {
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        let service = objects
            .iter()
            .find(|o| o["kind"] == "Service" && selects(selector, &o["metadata"]["labels"]))
            .unwrap_or_else(|| panic!("{} selects no Service", describe(monitor)));
        for endpoint in monitor["spec"]["endpoints"].as_array().unwrap() {
            assert!(
                service["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == endpoint["port"])
            );
        }
    }

    // The dashboard reads only metrics the code exports.
    let dashboard: ConfigMap = one(&objects, "ConfigMap", "lvmlocal-dashboard");
    assert_eq!(
        dashboard
            .metadata
            .labels
            .unwrap()
            .get("grafana_dashboard")
            .map(String::as_str),
        Some("1")
    );
    let json: Value =
        serde_json::from_str(&dashboard.data.unwrap()["lvmlocal-dashboard.json"]).unwrap();
    let known = metric_names_of_the_code().await;
    let mut charted = BTreeMap::new();
    for panel in json["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for name in lvmlocal_names(expr) {
                charted.insert(name, panel["title"].as_str().unwrap().to_owned());
            }
        }
    }
    for (name, panel) in &charted {
        assert!(
            known.contains(name),
            "panel {panel:?} charts {name}, which nothing exports"
        );
    }
    // What the issue asks the dashboard to show.
    for wanted in [
        "lvmlocal_agent_vg_free_bytes",
        "lvmlocal_agent_vg_allocated_bytes",
        "lvmlocal_csi_operations_total",
        "lvmlocal_agent_csi_operations_total",
        "lvmlocal_csi_operation_duration_seconds_bucket",
        "lvmlocal_scheduler_request_duration_seconds_bucket",
        "lvmlocal_scheduler_filtered_nodes_total",
        "lvmlocal_agent_media_load_percent",
    ] {
        assert!(charted.contains_key(wanted), "{wanted} is not charted");
    }
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("matchLabels");
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

/// The `lvmlocal_*` metric names in a PromQL expression.
fn lvmlocal_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("lvmlocal_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn example_stateful_set_spreads_nvme_volumes_over_nodes() {
    let example = documents(&read("deploy/examples/statefulset-nvme.yaml"));
    let set: StatefulSet = one(&example, "StatefulSet", "db");
    let spec = set.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    let anti = spec
        .template
        .spec
        .unwrap()
        .affinity
        .unwrap()
        .pod_anti_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(anti[0].topology_key, "kubernetes.io/hostname");
    let selected = anti[0]
        .label_selector
        .clone()
        .unwrap()
        .match_labels
        .unwrap();
    assert!(selected.iter().all(|(k, v)| labels.get(k) == Some(v)));

    let base = render("deploy/base");
    let claims = spec.volume_claim_templates.unwrap();
    assert_eq!(claims.len(), 1);
    let class_name = claims[0].spec.clone().unwrap().storage_class_name.unwrap();
    let class: StorageClass = one(&base, "StorageClass", &class_name);
    assert_eq!(class.parameters.unwrap()[MEDIA_PARAM], "nvme");

    let first = documents(&read("deploy/examples/pvc-and-pod.yaml"));
    let claim: PersistentVolumeClaim = one(&first, "PersistentVolumeClaim", "first");
    let class_name = claim.spec.unwrap().storage_class_name.unwrap();
    let _: StorageClass = one(&base, "StorageClass", &class_name);
}

/// The admission policy checks StorageClasses with the names the driver
/// reads: every parameter, media class, filesystem, placement and choice
/// on node loss.
#[test]
fn storage_class_policy_knows_the_drivers_names() {
    let objects = render("deploy/base");
    let policy = named(
        &objects,
        "ValidatingAdmissionPolicy",
        "lvmlocal-storageclass-parameters",
    );
    let text = policy.to_string();
    assert!(
        text.contains(&format!("object.provisioner == \\\"{DRIVER_NAME}\\\"")),
        "{text}"
    );
    for name in [
        MEDIA_PARAM,
        PLACEMENT_PARAM,
        FS_TYPE_PARAM,
        ON_NODE_LOSS,
        PROVISIONING_PARAM,
        OVERPROVISION_PARAM,
        "csi.storage.k8s.io/",
    ]
    .into_iter()
    .chain(MediaClass::ALL.iter().map(|media| media.as_str()))
    .chain([
        "ext4", "xfs", "binpack", "spread", "keep", "recreate", "thick", "thin",
    ]) {
        assert!(
            text.contains(&format!("\\\"{name}\\\"")),
            "{name} not in {text}"
        );
    }
    for key in io_limits::KEYS {
        assert!(
            text.contains(&format!("\\\"{key}\\\"")),
            "{key} not in {text}"
        );
    }
    let binding = named(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "lvmlocal-storageclass-parameters",
    );
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"][0], "Deny");

    // A VolumeAttributesClass of the driver may set the IO limits only.
    let policy = named(
        &objects,
        "ValidatingAdmissionPolicy",
        "lvmlocal-volumeattributesclass-parameters",
    );
    let text = policy.to_string();
    assert!(
        text.contains(&format!("object.driverName == \\\"{DRIVER_NAME}\\\"")),
        "{text}"
    );
    for key in io_limits::KEYS {
        assert!(
            text.contains(&format!("\\\"{key}\\\"")),
            "{key} not in {text}"
        );
    }
    for other in [MEDIA_PARAM, PLACEMENT_PARAM, ON_NODE_LOSS] {
        assert!(!text.contains(other), "{other} in {text}");
    }
    let binding = named(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "lvmlocal-volumeattributesclass-parameters",
    );
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"][0], "Deny");
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// LogicalVolumes may be deleted by the controller's ServiceAccount, in
/// whatever namespace lvmlocal runs, or once they carry the annotation the
/// agent reads as the deletion intent.
#[test]
fn deletion_policy_names_the_controller_and_the_intent() {
    for dir in ["deploy/base", "deploy/overlays/namespace"] {
        let objects = render(dir);
        let account: ServiceAccount = one(&objects, "ServiceAccount", "lvmlocal-controller");
        let namespace = account.metadata.namespace.unwrap();
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(
            named(
                &objects,
                "ValidatingAdmissionPolicy",
                "lvmlocal-logicalvolume-deletion",
            )
            .clone(),
        )
        .unwrap();
        let spec = policy.spec.unwrap();
        let variables = spec.variables.unwrap();
        let controller = variables.iter().find(|v| v.name == "controller").unwrap();
        assert_eq!(
            controller.expression,
            format!("'system:serviceaccount:{namespace}:lvmlocal-controller'"),
            "{dir}"
        );
        let intent = variables.iter().find(|v| v.name == "intent").unwrap();
        assert!(
            intent.expression.contains(&format!("\"{DELETE_INTENT}\"")),
            "{}",
            intent.expression
        );
        let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
        assert_eq!(rules[0].resources, Some(vec!["logicalvolumes".to_owned()]));
        assert_eq!(rules[0].operations, Some(vec!["DELETE".to_owned()]));
        let binding = named(
            &objects,
            "ValidatingAdmissionPolicyBinding",
            "lvmlocal-logicalvolume-deletion",
        );
        assert_eq!(binding["spec"]["validationActions"][0], "Deny");
    }
}
