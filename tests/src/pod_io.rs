//! IO that a pod's cgroup does on a kubelet node in the VM: `dd` run in a
//! cgroup of its own under the pod's, as a container of the pod would, and
//! what the cgroup's `io.stat` counted; the pieces that IO limits are
//! proven and measured with.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::{Value, json};

use crate::cluster::{Cluster, NodeVm};

/// A VolumeAttributesClass of lvmlocal.io with `parameters`.
pub fn attributes_class(name: &str, parameters: Value) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "VolumeAttributesClass",
        "metadata": {"name": name},
        "driverName": "lvmlocal.io",
        "parameters": parameters,
    })
}

/// The `MAJ:MIN` of volume `volume`'s LV on `node`.
pub fn volume_device(cluster: &Cluster, node: &NodeVm, volume: &str) -> anyhow::Result<String> {
    let lv = cluster.get(&["logicalvolume", volume])?;
    let path = lv["status"]["devicePath"]
        .as_str()
        .with_context(|| format!("LogicalVolume {volume} has no device yet: {lv}"))?;
    Ok(node
        .sh(&format!(
            "printf '%d:%d' 0x$(stat -L -c %t {path}) 0x$(stat -L -c %T {path})"
        ))?
        .trim()
        .to_owned())
}

/// What one `dd` in a pod's cgroup did: bytes it moved and seconds it took,
/// by its own count, and what its cgroup's `io.stat` counted on the
/// volume's device.
pub struct Run {
    pub bytes: f64,
    pub seconds: f64,
    pub device: BTreeMap<String, f64>,
}

impl Run {
    /// The device's count of `key` (`wbytes`, `rios`, ...) per second.
    pub fn device_rate(&self, key: &str) -> f64 {
        self.device.get(key).copied().unwrap_or(0.0) / self.seconds
    }
}

/// Shell lines that set `$cg` to pod `uid`'s cgroup in kubelet's cgroupfs
/// layout (any QoS class), or fail naming the pod.
fn pod_cgroup(uid: &str) -> String {
    format!(
        "cg=$(for d in /sys/fs/cgroup/kubepods/pod{uid} /sys/fs/cgroup/kubepods/*/pod{uid}; do \
           [ -d $d ] && echo $d; done | head -n 1)\n\
         [ -n \"$cg\" ] || {{ echo no cgroup for pod {uid}; exit 1; }}\n"
    )
}

/// The `io.max` of pod `uid`'s cgroup on `node`.
pub fn pod_io_max(node: &NodeVm, uid: &str) -> anyhow::Result<String> {
    node.sh(&format!("{}cat $cg/io.max", pod_cgroup(uid)))
}

/// Gives claim `claim` in `namespace` the VolumeAttributesClass `class`:
/// csi-resizer then calls ControllerModifyVolume.
pub fn set_attributes_class(
    cluster: &Cluster,
    namespace: &str,
    claim: &str,
    class: &str,
) -> anyhow::Result<()> {
    cluster
        .kubectl(&[
            "patch",
            "pvc",
            claim,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            &json!({"spec": {"volumeAttributesClassName": class}}).to_string(),
        ])
        .map(drop)
}

/// Runs `command` in the guest in a cgroup of its own under pod `uid`'s
/// cgroup, as a container of the pod would; `device` is the volume's
/// `MAJ:MIN`.
pub fn dd_in_pod(node: &NodeVm, uid: &str, device: &str, command: &str) -> anyhow::Result<Run> {
    let output = node.sh(&format!(
        "{}mkdir -p $cg/io-test\n\
             sh -c \"echo \\$\\$ > $cg/io-test/cgroup.procs && exec {command}\" 2>&1; rc=$?\n\
             grep '^{device} ' $cg/io-test/io.stat\n\
             rmdir $cg/io-test\n\
             exit $rc",
        pod_cgroup(uid)
    ))?;
    // GNU dd: "37748736 bytes (38 MB, 36 MiB) copied, 6.01 s, 6.3 MB/s"
    let line = output
        .lines()
        .rfind(|line| line.contains(" copied, "))
        .with_context(|| format!("no dd summary in {output}"))?;
    let bytes: f64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no byte count in {line}"))?;
    let seconds: f64 = line
        .split(" copied, ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no time in {line}"))?;
    let device = output
        .lines()
        .find(|line| line.starts_with(&format!("{device} ")))
        .with_context(|| format!("no io.stat for {device} in {output}"))?
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.parse().unwrap_or(0.0)))
        .collect();
    Ok(Run {
        bytes,
        seconds,
        device,
    })
}
