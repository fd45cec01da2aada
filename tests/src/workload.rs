//! Claims and pods as the tests create them, in the `default` namespace.
//! Pods that a kubelet node runs use the shell image `scripts/images.sh`
//! builds and the host's network: the node has no CNI network.

use serde_json::{Value, json};

/// The namespace of the tests' claims and pods.
pub const NS: &str = "default";
/// Built by scripts/images.sh and imported into the node's containerd.
pub const SHELL_IMAGE: &str = "lvmlocal.test/shell:1";

/// A ReadWriteOnce claim of `size` in StorageClass `class`.
pub fn claim(name: &str, class: &str, size: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        },
    })
}

/// A pod that runs `script` once in the shell image, with claim `claim` (if
/// any) at /data; what it writes to /dev/termination-log is its message.
pub fn shell_pod(name: &str, claim: Option<&str>, script: &str) -> Value {
    let (mounts, volumes) = match claim {
        Some(claim) => (
            json!([{"name": "data", "mountPath": "/data"}]),
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]),
        ),
        None => (json!([]), json!([])),
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "hostNetwork": true,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "job",
                "image": SHELL_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    })
}

/// A StatefulSet `name` of `replicas` pods (label `app: <name>`) running
/// `script` in the shell image, each with its own claim `data-<name>-<i>` of
/// `size` in StorageClass `class` at /data; the pod's uid is in `$POD_UID`.
pub fn shell_stateful_set(
    name: &str,
    replicas: u32,
    class: &str,
    size: &str,
    script: &str,
) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "serviceName": name,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "hostNetwork": true,
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": name,
                        "image": SHELL_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", script],
                        "env": [{"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": class,
                    "resources": {"requests": {"storage": size}},
                },
            }],
        },
    })
}
