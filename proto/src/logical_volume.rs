//! The `LogicalVolume` ↔ volume mapping: what an object says about the
//! volume it stands for, read alike by the controller and the agent.

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::DRIVER_NAME;
use crate::crd::{DELETE_INTENT, LogicalVolume, LogicalVolumePhase};
use crate::store::StoreError;
use crate::volume::{Access, Volume, VolumeId, VolumeState};

/// What a `LogicalVolume` says about its volume.
pub fn volume_of(lv: &LogicalVolume) -> Result<Volume, StoreError> {
    let name = lv.name_any();
    let id = VolumeId::parse(&name)
        .map_err(|err| StoreError::Corrupt(format!("LogicalVolume {name:?}: {err}")))?;
    let access = match &lv.spec.fs_type {
        None => Access::Block,
        Some(fs) => Access::Filesystem(
            fs.parse()
                .map_err(|err| StoreError::Corrupt(format!("LogicalVolume {name}: {err}")))?,
        ),
    };
    Ok(Volume {
        id,
        node: lv.spec.node_name.clone(),
        media: lv.spec.media,
        access,
        size_bytes: lv.spec.size_bytes,
        state: state_of(lv),
        actual_bytes: lv.status.as_ref().and_then(|status| status.size_bytes),
        generation: lv.metadata.generation.unwrap_or(0),
        condition: lv
            .status
            .as_ref()
            .and_then(|status| status.condition.clone()),
        io_limits: lv.spec.io_limits.unwrap_or_default(),
        thin: lv.spec.thin.map(|thin| thin.ratio()),
        snapshot_of: match &lv.spec.snapshot {
            Some(snapshot) => Some(VolumeId::parse(&snapshot.source_volume).map_err(|err| {
                StoreError::Corrupt(format!("LogicalVolume {name}: spec.snapshot: {err}"))
            })?),
            None => None,
        },
        source: lv.spec.source.clone(),
        created_seconds: lv
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|time| time.0.as_second()),
    })
}

/// Who asked for the deletion of `lv`, as recorded on it; None when nobody
/// did (a bare `kubectl delete`, a pruning tool, the CRD's removal).
pub fn delete_intent(lv: &LogicalVolume) -> Option<&str> {
    lv.annotations()
        .get(DELETE_INTENT)
        .map(|intent| intent.trim())
        .filter(|intent| !intent.is_empty())
}

/// The volume `pv` stands for, if it is a PersistentVolume of this driver.
pub fn volume_handle(pv: &PersistentVolume) -> Option<&str> {
    pv.spec
        .as_ref()?
        .csi
        .as_ref()
        .filter(|csi| csi.driver == DRIVER_NAME)
        .map(|csi| csi.volume_handle.as_str())
}

/// Whether `pv` is a PersistentVolume of this driver for volume `id`.
pub fn names_volume(pv: &PersistentVolume, id: &str) -> bool {
    volume_handle(pv) == Some(id)
}

/// The names of the PersistentVolumes that name volume `id`, read from the
/// API server itself: a cache that lags could hide one that still exists.
pub async fn persistent_volumes_naming(
    api: &Api<PersistentVolume>,
    id: &str,
) -> Result<Vec<String>, kube::Error> {
    let pvs = api.list(&ListParams::default()).await?;
    Ok(pvs
        .items
        .iter()
        .filter(|pv| names_volume(pv, id))
        .map(ResourceExt::name_any)
        .collect())
}

fn state_of(lv: &LogicalVolume) -> VolumeState {
    if lv.metadata.deletion_timestamp.is_some() {
        return VolumeState::Deleting;
    }
    let Some(status) = &lv.status else {
        return VolumeState::Pending;
    };
    // A status written for an older generation answers an older request;
    // agents that do not write observedGeneration are taken at their word.
    let current = match (status.observed_generation, lv.metadata.generation) {
        (Some(observed), Some(generation)) => observed >= generation,
        _ => true,
    };
    match status.phase {
        LogicalVolumePhase::Ready => match status.size_bytes {
            Some(size_bytes) => VolumeState::Ready { size_bytes },
            None if current => VolumeState::Ready {
                size_bytes: lv.spec.size_bytes,
            },
            None => VolumeState::Pending,
        },
        LogicalVolumePhase::Failed if current => VolumeState::Failed {
            message: status
                .message
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
            lv_exists: status.size_bytes.is_some() || status.device_path.is_some(),
        },
        _ => VolumeState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MediaClass;
    use crate::crd::{LogicalVolumeSpec, LogicalVolumeStatus};

    fn lv(name: &str, node: &str, size: u64, generation: i64) -> LogicalVolume {
        let mut lv = LogicalVolume::new(
            name,
            LogicalVolumeSpec {
                node_name: node.into(),
                media: MediaClass::Nvme,
                size_bytes: size,
                fs_type: Some("ext4".into()),
                pvc: None,
                io_limits: None,
                thin: None,
                snapshot: None,
                source: None,
            },
        );
        lv.metadata.generation = Some(generation);
        lv
    }

    fn status(
        phase: LogicalVolumePhase,
        size: Option<u64>,
        observed: Option<i64>,
    ) -> LogicalVolumeStatus {
        LogicalVolumeStatus {
            phase,
            device_path: size.map(|_| "/dev/lvmlocal-nvme/v".into()),
            size_bytes: size,
            message: (phase == LogicalVolumePhase::Failed).then(|| "not enough space".into()),
            observed_generation: observed,
            condition: None,
            io_limits: None,
        }
    }

    #[test]
    fn state_follows_the_agent_status_of_the_current_generation() {
        use LogicalVolumePhase::*;
        let cases = [
            (None, VolumeState::Pending),
            (Some(status(Pending, None, Some(2))), VolumeState::Pending),
            (
                Some(status(Ready, Some(100), Some(2))),
                VolumeState::Ready { size_bytes: 100 },
            ),
            // Mid-expansion: ready at the old size, not settled for the new.
            (
                Some(status(Ready, Some(50), Some(1))),
                VolumeState::Ready { size_bytes: 50 },
            ),
            (
                Some(status(Ready, None, None)),
                VolumeState::Ready { size_bytes: 100 },
            ),
            (Some(status(Ready, None, Some(1))), VolumeState::Pending),
            (
                Some(status(Failed, None, Some(2))),
                VolumeState::Failed {
                    message: "not enough space".into(),
                    lv_exists: false,
                },
            ),
            (
                Some(status(Failed, Some(50), None)),
                VolumeState::Failed {
                    message: "not enough space".into(),
                    lv_exists: true,
                },
            ),
            // A failure of the previous request says nothing about this one.
            (Some(status(Failed, None, Some(1))), VolumeState::Pending),
        ];
        for (status, want) in cases {
            let mut object = lv("v", "n", 100, 2);
            object.status = status.clone();
            assert_eq!(state_of(&object), want, "{status:?}");
        }
        let mut deleting = lv("v", "n", 100, 2);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(state_of(&deleting), VolumeState::Deleting);
    }

    #[test]
    fn volume_of_refuses_foreign_objects() {
        assert!(volume_of(&lv("v", "n", 1, 1)).is_ok());
        let err = volume_of(&lv("Bad_Name", "n", 1, 1)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        let mut weird_fs = lv("v", "n", 1, 1);
        weird_fs.spec.fs_type = Some("ntfs".into());
        assert!(matches!(volume_of(&weird_fs), Err(StoreError::Corrupt(_))));
        let mut raw = lv("v", "n", 1, 1);
        raw.spec.fs_type = None;
        assert_eq!(volume_of(&raw).unwrap().access, Access::Block);
    }
}
