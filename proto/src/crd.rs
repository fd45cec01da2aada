//! The custom resources: the cluster's view of what LVM holds on each node.
//! Their YAML is generated from these types, never written by hand.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::MediaClass;
use crate::io_limits::IoLimits;
use crate::thin::Ratio;

/// Keeps a `LogicalVolume` until its LV is gone from the node.
pub const LV_FINALIZER: &str = "lvmlocal.io/logical-volume";

/// The annotation that records who asked for a `LogicalVolume`'s deletion.
/// The agent removes the LV of a deleted object only when the object
/// carries it; any other deletion leaves the LV as an orphan.
pub const DELETE_INTENT: &str = "lvmlocal.io/delete-intent";

/// The disks and volume groups of one node, written by the node's agent.
/// Cluster-scoped; the name is the node's name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "lvmlocal.io",
    version = "v1alpha1",
    kind = "NodeLocalStorage",
    plural = "nodelocalstorages",
    shortname = "nls",
    status = "NodeLocalStorageStatus",
    printcolumn = r#"{"name":"NVMe Free","type":"string","jsonPath":".status.nvme.free"}"#,
    printcolumn = r#"{"name":"SSD Free","type":"string","jsonPath":".status.ssd.free"}"#,
    printcolumn = r#"{"name":"HDD Free","type":"string","jsonPath":".status.hdd.free"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeLocalStorageSpec {
    pub node_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeLocalStorageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<MediaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssd: Option<MediaStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdd: Option<MediaStatus>,
    /// Every whole disk of the node, usable or not, with the reason.
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    /// LVs of lvmlocal on this node that no `LogicalVolume` names: kept,
    /// never removed by the agent. Written by the agent's orphan audit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphaned_volumes: Vec<OrphanedVolume>,
    /// Bytes of each volume group that no `LogicalVolume` of the node
    /// accounts for: LVs made by hand, orphans, LVs being removed. The
    /// extender and GetCapacity count them as used. Written by the orphan
    /// audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unaccounted_bytes: Option<MediaBytes>,
    /// The thin pool of each volume group that has one. Written by the
    /// orphan audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin_pools: Option<ThinPools>,
    /// How busy the disks of each volume group are, smoothed over about a
    /// minute. Written by the agent's load sampler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<NodeLoad>,
}

/// The load of each media class's disks on one node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeLoad {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<MediaLoad>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssd: Option<MediaLoad>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdd: Option<MediaLoad>,
}

impl NodeLoad {
    pub fn get(&self, media: MediaClass) -> Option<MediaLoad> {
        match media {
            MediaClass::Nvme => self.nvme,
            MediaClass::Ssd => self.ssd,
            MediaClass::Hdd => self.hdd,
        }
    }

    pub fn get_mut(&mut self, media: MediaClass) -> &mut Option<MediaLoad> {
        match media {
            MediaClass::Nvme => &mut self.nvme,
            MediaClass::Ssd => &mut self.ssd,
            MediaClass::Hdd => &mut self.hdd,
        }
    }
}

/// How busy the disks of one volume group are, averaged over its disks.
/// `loadPercent` is what placement ranks by (see `load::measure`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaLoad {
    /// 0 (idle) to 100 (saturated): utilisation and queue depth, each
    /// counting for half.
    pub load_percent: u32,
    /// Share of the time the disks had an I/O in flight.
    pub busy_percent: u32,
    /// Average number of I/Os in flight, in thousandths.
    pub queue_depth_milli: u32,
}

/// A number of bytes per media class.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaBytes {
    #[serde(default)]
    pub nvme: u64,
    #[serde(default)]
    pub ssd: u64,
    #[serde(default)]
    pub hdd: u64,
}

impl MediaBytes {
    pub fn get(&self, media: MediaClass) -> u64 {
        match media {
            MediaClass::Nvme => self.nvme,
            MediaClass::Ssd => self.ssd,
            MediaClass::Hdd => self.hdd,
        }
    }

    pub fn get_mut(&mut self, media: MediaClass) -> &mut u64 {
        match media {
            MediaClass::Nvme => &mut self.nvme,
            MediaClass::Ssd => &mut self.ssd,
            MediaClass::Hdd => &mut self.hdd,
        }
    }
}

impl NodeLocalStorageStatus {
    /// What no `LogicalVolume` accounts for in the group of `media`.
    pub fn unaccounted(&self, media: MediaClass) -> u64 {
        self.unaccounted_bytes
            .as_ref()
            .map_or(0, |bytes| bytes.get(media))
    }

    /// The load of the group of `media`; 0 where none was reported.
    pub fn load_percent(&self, media: MediaClass) -> u32 {
        self.load
            .and_then(|load| load.get(media))
            .map_or(0, |load| load.load_percent)
    }
}

/// An LV that carries lvmlocal's tags but that no object names, e.g. after
/// its `LogicalVolume` was deleted without a deletion intent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrphanedVolume {
    /// The volume id: the name a re-created `LogicalVolume` needs to adopt it.
    pub id: String,
    pub media: MediaClass,
    pub device_path: String,
    pub size_bytes: u64,
    /// `namespace/name` of the claim it was made for, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
}

impl NodeLocalStorageStatus {
    pub fn media(&self, media: MediaClass) -> Option<&MediaStatus> {
        match media {
            MediaClass::Nvme => self.nvme.as_ref(),
            MediaClass::Ssd => self.ssd.as_ref(),
            MediaClass::Hdd => self.hdd.as_ref(),
        }
    }

    pub fn media_mut(&mut self, media: MediaClass) -> &mut Option<MediaStatus> {
        match media {
            MediaClass::Nvme => &mut self.nvme,
            MediaClass::Ssd => &mut self.ssd,
            MediaClass::Hdd => &mut self.hdd,
        }
    }
}

/// The volume group of one media class on a node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaStatus {
    pub vg_name: String,
    pub total_bytes: u64,
    /// Not yet taken by logical volumes, as LVM reports it.
    pub free_bytes: u64,
    pub allocated_bytes: u64,
    /// LVM's allocation unit: every volume size is a multiple of it.
    pub extent_bytes: u64,
    /// `free_bytes` for people, e.g. `119.5Gi`.
    pub free: String,
    /// Some physical volume of the group is missing.
    #[serde(default)]
    pub degraded: bool,
    /// Why the group cannot grow or be used, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The thin pools of one node, by media class.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThinPools {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<ThinPoolStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssd: Option<ThinPoolStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdd: Option<ThinPoolStatus>,
}

impl NodeLocalStorageStatus {
    /// The room the thin pool of `media` has for new thin volumes.
    pub fn thin_free(&self, media: MediaClass) -> u64 {
        self.thin_pools
            .as_ref()
            .and_then(|pools| pools.get(media))
            .map_or(0, |pool| pool.free_bytes)
    }
}

impl ThinPools {
    pub fn get(&self, media: MediaClass) -> Option<&ThinPoolStatus> {
        match media {
            MediaClass::Nvme => self.nvme.as_ref(),
            MediaClass::Ssd => self.ssd.as_ref(),
            MediaClass::Hdd => self.hdd.as_ref(),
        }
    }

    pub fn get_mut(&mut self, media: MediaClass) -> &mut Option<ThinPoolStatus> {
        match media {
            MediaClass::Nvme => &mut self.nvme,
            MediaClass::Ssd => &mut self.ssd,
            MediaClass::Hdd => &mut self.hdd,
        }
    }
}

/// The thin pool of one volume group: what backs its thin volumes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThinPoolStatus {
    /// The pool LV's name in its volume group.
    pub name: String,
    /// Size of the pool's data: what its thin volumes can write in all.
    pub data_bytes: u64,
    /// Of which written: the pool's real use.
    pub data_used_bytes: u64,
    /// Whole percent, rounded up.
    pub data_percent: u32,
    pub metadata_bytes: u64,
    pub metadata_percent: u32,
    /// Sum of the sizes of the thin volumes in it.
    pub virtual_bytes: u64,
    /// Data no thin volume's charge takes: room for new thin volumes (and
    /// for no thick one), counted in `unaccountedBytes`.
    pub free_bytes: u64,
}

/// One whole disk and lvmlocal's verdict on it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    /// Where the disk is plugged in; stable across reboots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Kernel name today (`nvme0n1`); may differ after a reboot.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaClass>,
    /// `usable`, `member`, or why it is refused (`signature`, `mounted`, ...).
    pub state: String,
    /// The verdict in words.
    pub reason: String,
}

/// One volume: created by the controller for a PVC, carried out by the agent
/// of `spec.nodeName`. Cluster-scoped; the name is the CSI volume id.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "lvmlocal.io",
    version = "v1alpha1",
    kind = "LogicalVolume",
    plural = "logicalvolumes",
    shortname = "llv",
    status = "LogicalVolumeStatus",
    selectable = ".spec.nodeName",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Media","type":"string","jsonPath":".spec.media"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.sizeBytes"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"PVC","type":"string","jsonPath":".spec.pvc.name","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.fsType) == has(oldSelf.fsType) && has(self.pvc) == has(oldSelf.pvc) && has(self.thin) == has(oldSelf.thin) && has(self.snapshot) == has(oldSelf.snapshot) && has(self.source) == has(oldSelf.source)").message("spec.fsType, spec.pvc, spec.thin, spec.snapshot and spec.source cannot be added or removed"))]
pub struct LogicalVolumeSpec {
    /// Where the LV lives: moving the object would orphan it.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.nodeName is immutable: the LV lives on that node"))]
    pub node_name: String,
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.media is immutable: the LV lives in that media class's volume group"))]
    pub media: MediaClass,
    /// Requested size; the LV is this, rounded up to the extent size.
    pub size_bytes: u64,
    /// `ext4` or `xfs`; absent for raw block volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.fsType is immutable"))]
    pub fs_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.pvc is immutable"))]
    pub pvc: Option<PvcRef>,
    /// The IO limits the volume's pods are held to; changed by
    /// ControllerModifyVolume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_limits: Option<IoLimits>,
    /// Present for a thin volume: a thin LV in the thin pool of its media
    /// class; absent for a thick (linear) one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.thin is immutable"))]
    pub thin: Option<ThinSpec>,
    /// Present on a snapshot: a read-only thin snapshot of the volume it
    /// names, on the same node. Its name is the CSI snapshot id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.snapshot is immutable"))]
    pub snapshot: Option<SnapshotSpec>,
    /// What a volume was made from: a snapshot (a restore) or a volume (a
    /// clone), on the same node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.source is immutable"))]
    pub source: Option<ContentSource>,
}

/// What a snapshot is of.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// The id of the volume the snapshot was taken of. The snapshot stays
    /// when that volume is deleted.
    pub source_volume: String,
    /// The VolumeSnapshot it was made for, when the snapshotter said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<PvcRef>,
}

/// The snapshot or volume a volume was made from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContentSource {
    pub kind: SourceKind,
    /// The snapshot id or volume id.
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SourceKind {
    Snapshot,
    Volume,
}

/// How a thin volume is accounted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThinSpec {
    /// The overprovisioning ratio in hundredths (200: 2.0): the volume is
    /// charged its size divided by the ratio against its volume group.
    #[schemars(range(min = 100, max = 10000))]
    pub overprovision_percent: u32,
}

impl ThinSpec {
    pub fn ratio(&self) -> Ratio {
        Ratio::from_percent(self.overprovision_percent).unwrap_or(Ratio::ONE)
    }
}

impl LogicalVolume {
    /// What the volume takes from its volume group: the asked size, or once
    /// made, the LV's actual size (rounded up to whole extents) if larger.
    /// A thin volume takes that divided by its overprovisioning ratio.
    pub fn charged_bytes(&self) -> u64 {
        let size = self
            .status
            .as_ref()
            .and_then(|status| status.size_bytes)
            .map_or(self.spec.size_bytes, |actual| {
                actual.max(self.spec.size_bytes)
            });
        match &self.spec.thin {
            // A snapshot shares its origin's blocks: what it holds alone
            // shows in its pool's real use.
            Some(_) if self.spec.snapshot.is_some() => 0,
            Some(thin) => thin.ratio().charge(size),
            None => size,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LogicalVolumePhase {
    /// Not yet acted on by the agent.
    #[default]
    Pending,
    /// The LV exists with at least the requested size.
    Ready,
    /// The agent cannot make it (e.g. not enough free space); see the message.
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogicalVolumeStatus {
    pub phase: LogicalVolumePhase,
    /// `/dev/<vg>/<lv>` on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_path: Option<String>,
    /// Actual size of the LV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The health of a volume that was made: what ControllerGetVolume and
    /// the external health monitor report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<VolumeCondition>,
    /// What the node does about `spec.ioLimits`; absent while the volume
    /// has none and never had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_limits: Option<IoLimitsStatus>,
}

/// The agent's word on a volume's IO limits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IoLimitsStatus {
    /// The limits the agent holds the volume's pods to: written into the
    /// cgroup of every pod that has the volume published, and of every pod
    /// that publishes it later.
    pub applied: IoLimits,
    /// False when the node cannot enforce them (no cgroup v2, or no io
    /// controller) or writing them failed; the message says why. The
    /// volume works either way.
    pub enforced: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCondition {
    pub abnormal: bool,
    /// `Healthy`, `VolumeUnhealthy` (LVM reports the LV inactive or
    /// partial) or `VolumeLost` (the LV is gone from its node).
    pub reason: String,
    pub message: String,
}

impl VolumeCondition {
    pub fn healthy() -> Self {
        Self {
            abnormal: false,
            reason: "Healthy".to_owned(),
            message: "healthy".to_owned(),
        }
    }

    pub fn abnormal(reason: &str, message: impl Into<String>) -> Self {
        Self {
            abnormal: true,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};

    #[test]
    fn names_match_the_design() {
        assert_eq!(NodeLocalStorage::api_version(&()), "lvmlocal.io/v1alpha1");
        assert_eq!(NodeLocalStorage::plural(&()), "nodelocalstorages");
        assert_eq!(LogicalVolume::kind(&()), "LogicalVolume");
        let crd = LogicalVolume::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("logicalvolumes.lvmlocal.io")
        );
        assert_eq!(NodeLocalStorage::crd().spec.scope, "Cluster");
        // Each agent watches only its own node's volumes with a field selector.
        let selectable = crd.spec.versions[0].selectable_fields.clone().unwrap();
        assert_eq!(selectable[0].json_path, ".spec.nodeName");
    }

    #[test]
    fn logical_volume_wire_format() {
        let json = serde_json::json!({
            "apiVersion": "lvmlocal.io/v1alpha1",
            "kind": "LogicalVolume",
            "metadata": {"name": "pvc-1a2b"},
            "spec": {
                "nodeName": "node-1",
                "media": "nvme",
                "sizeBytes": 1073741824u64,
                "fsType": "ext4",
                "pvc": {"namespace": "db", "name": "data-0"}
            },
            "status": {"phase": "Ready", "devicePath": "/dev/lvmlocal-nvme/pvc-1a2b", "sizeBytes": 1073741824u64}
        });
        let lv: LogicalVolume = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(lv.spec.media, MediaClass::Nvme);
        assert_eq!(lv.status.as_ref().unwrap().phase, LogicalVolumePhase::Ready);
        assert_eq!(serde_json::to_value(&lv).unwrap(), json);
    }

    #[test]
    fn printer_columns_point_at_real_fields() {
        let crd = NodeLocalStorage::crd();
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap();
        let paths: Vec<&str> = columns.iter().map(|c| c.json_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                ".status.nvme.free",
                ".status.ssd.free",
                ".status.hdd.free",
                ".metadata.creationTimestamp"
            ]
        );
        let mut status = NodeLocalStorageStatus::default();
        *status.media_mut(MediaClass::Ssd) = Some(MediaStatus {
            free: "1.0Gi".into(),
            ..MediaStatus::default()
        });
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["ssd"]["free"], "1.0Gi");
        assert!(json.get("nvme").is_none());
    }
}
