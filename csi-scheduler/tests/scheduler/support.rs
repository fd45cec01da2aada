//! Cluster objects for the extender's tests, written as the API server would
//! serve them.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::extender::ExtenderArgs;
use lvmlocal_proto::heartbeat;
use serde_json::{Value, json};

use csi_scheduler::extender::{Extender, Policy};
use csi_scheduler::inventory::Inventory;
use csi_scheduler::metrics::Metrics;
use lvmlocal_proto::params::Placement;

pub const GI: u64 = 1 << 30;
pub const EXTENT: u64 = 4 << 20;

pub fn policy() -> Policy {
    Policy {
        default_placement: Placement::Binpack,
        reservation_ttl: Duration::from_secs(30),
        max_reservations: csi_scheduler::reservation::DEFAULT_LIMIT,
    }
}

/// An extender whose caches have completed their first listing.
pub fn extender(policy: Policy) -> Extender {
    let extender = Extender::new(policy, Metrics::new());
    synced(&mut extender.inventory());
    extender
}

pub fn synced(inventory: &mut Inventory) {
    inventory.apply_storage(Event::InitDone);
    inventory.apply_volume(Event::InitDone);
    inventory.apply_claim(Event::InitDone);
    inventory.apply_class(Event::InitDone);
    inventory.apply_lease(Event::InitDone, Instant::now());
}

/// A node's `NodeLocalStorage` with one group per `(class, total bytes)`.
/// `freeBytes` is deliberately stale: the extender must not use it.
pub fn storage(node: &str, groups: &[(MediaClass, u64)]) -> NodeLocalStorage {
    let mut status = json!({"disks": []});
    for (media, total) in groups {
        status[media.as_str()] = json!({
            "vgName": format!("lvmlocal-{media}"),
            "totalBytes": total,
            "freeBytes": total,
            "allocatedBytes": 0,
            "extentBytes": EXTENT,
            "free": "stale",
        });
    }
    serde_json::from_value(json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "NodeLocalStorage",
        "metadata": {"name": node, "resourceVersion": "1"},
        "spec": {"nodeName": node},
        "status": status,
    }))
    .unwrap()
}

/// The heartbeat Lease of `node`'s agent as the agent writes it, lasting
/// 40 s; `renewed` (seconds since the epoch) is only compared for change.
pub fn heartbeat(node: &str, renewed: i64) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": heartbeat::lease_name(node),
            "namespace": "lvmlocal",
            "labels": {heartbeat::LABEL: heartbeat::LABEL_VALUE},
            "resourceVersion": "1",
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": 40,
            "renewTime": Timestamp::from_second(renewed).unwrap().to_string(),
        },
    }))
    .unwrap()
}

pub fn volume(
    name: &str,
    node: &str,
    media: MediaClass,
    bytes: u64,
    claim: Option<(&str, &str)>,
) -> LogicalVolume {
    let mut spec = json!({"nodeName": node, "media": media, "sizeBytes": bytes, "fsType": "ext4"});
    if let Some((namespace, name)) = claim {
        spec["pvc"] = json!({"namespace": namespace, "name": name});
    }
    serde_json::from_value(json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "LogicalVolume",
        "metadata": {"name": name, "resourceVersion": "1"},
        "spec": spec,
    }))
    .unwrap()
}

pub fn class(name: &str, media: MediaClass, placement: Option<Placement>) -> StorageClass {
    let mut parameters = json!({"lvmlocal.io/media": media, "csi.storage.k8s.io/fstype": "xfs"});
    if let Some(placement) = placement {
        parameters["lvmlocal.io/placement"] = json!(placement.as_str());
    }
    serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name, "resourceVersion": "1"},
        "provisioner": "lvmlocal.io",
        "parameters": parameters,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": true,
    }))
    .unwrap()
}

/// The three lvmlocal classes the tests use: `nvme`, `ssd` and `hdd`.
pub fn classes() -> Vec<StorageClass> {
    MediaClass::ALL
        .into_iter()
        .map(|media| class(media.as_str(), media, None))
        .collect()
}

/// A pending claim of `bytes` in `class`.
pub fn claim(namespace: &str, name: &str, class: &str, bytes: u64) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": bytes.to_string()}},
        },
        "status": {"phase": "Pending"},
    }))
    .unwrap()
}

/// The claim once kube-scheduler has picked `node` for its pod.
pub fn selected(mut claim: PersistentVolumeClaim, node: &str) -> PersistentVolumeClaim {
    claim
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("volume.kubernetes.io/selected-node".into(), node.into());
    claim
}

/// The claim once its volume is bound.
pub fn bound(mut claim: PersistentVolumeClaim, volume: &str) -> PersistentVolumeClaim {
    claim.spec.get_or_insert_default().volume_name = Some(volume.into());
    claim.status.get_or_insert_default().phase = Some("Bound".into());
    claim
}

/// A pod using the named claims of its namespace.
pub fn pod(namespace: &str, name: &str, uid: &str, claims: &[&str]) -> Pod {
    let volumes: Vec<Value> = claims
        .iter()
        .map(|claim| json!({"name": claim, "persistentVolumeClaim": {"claimName": claim}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"containers": [{"name": "app", "image": "app"}], "volumes": volumes},
    }))
    .unwrap()
}

pub fn names_args<'a>(pod: &Pod, nodes: &[&'a str]) -> ExtenderArgs<'a> {
    ExtenderArgs {
        pod: Some(pod.clone()),
        nodes: None,
        node_names: Some(nodes.iter().map(|&node| node.into()).collect()),
    }
}

/// Applies the cluster's objects as watch events, with a heartbeat just
/// renewed by the agent of each node that has storage.
pub fn apply_all(inventory: &mut Inventory, cluster: &Cluster) {
    let now = Instant::now();
    for nls in &cluster.storages {
        inventory.apply_storage(Event::Apply(nls.clone()));
        inventory.apply_lease(Event::Apply(heartbeat(&nls.name_any(), 1)), now);
    }
    for class in &cluster.classes {
        inventory.apply_class(Event::Apply(class.clone()));
    }
    for pvc in &cluster.claims {
        inventory.apply_claim(Event::Apply(pvc.clone()));
    }
    for lv in &cluster.volumes {
        inventory.apply_volume(Event::Apply(lv.clone()));
    }
}

#[derive(Default, Clone)]
pub struct Cluster {
    pub storages: Vec<NodeLocalStorage>,
    pub volumes: Vec<LogicalVolume>,
    pub claims: Vec<PersistentVolumeClaim>,
    pub classes: Vec<StorageClass>,
}
