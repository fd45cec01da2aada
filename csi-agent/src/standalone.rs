//! Standalone mode's store for the Controller service: the LV tags of this
//! node, and no Kubernetes API. The validation and error mapping are the
//! controller's own; only where volumes are kept differs.

use std::sync::Arc;

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::io_limits::IoLimits;
use lvmlocal_proto::placement::NodeCapacity;
use lvmlocal_proto::store::{Store, StoreError};
use lvmlocal_proto::volume::{Access, FsType, NewVolume, Volume, VolumeId, VolumeState};
use tokio::time::Instant;

use crate::volumes::{LocalVolume, VolumeError, VolumeRequest, Volumes};

pub struct LvTagStore {
    node: String,
    volumes: Arc<Volumes>,
}

impl LvTagStore {
    pub fn new(node: &str, volumes: Arc<Volumes>) -> Self {
        Self {
            node: node.to_owned(),
            volumes,
        }
    }

    fn volume(&self, local: LocalVolume) -> Result<Volume, StoreError> {
        let access = match local.access.as_str() {
            "block" => Access::Block,
            fs => Access::Filesystem(
                fs.parse::<FsType>()
                    .map_err(|err| StoreError::Corrupt(format!("LV {}: {err}", local.id)))?,
            ),
        };
        Ok(Volume {
            id: VolumeId::parse(&local.id)
                .map_err(|err| StoreError::Corrupt(format!("LV {}: {err}", local.id)))?,
            node: self.node.clone(),
            media: local.media,
            access,
            size_bytes: local.requested_bytes,
            state: VolumeState::Ready {
                size_bytes: local.size_bytes,
            },
            actual_bytes: Some(local.size_bytes),
            // Each change is carried out before the store answers: there is
            // never an older generation to wait for.
            generation: 1,
            condition: Some(local.condition()),
            io_limits: IoLimits::NONE,
            thin: local.thin,
            snapshot_of: None,
            source: None,
            created_seconds: None,
        })
    }
}

fn unavailable(what: &str) -> impl FnOnce(VolumeError) -> StoreError + '_ {
    move |err| StoreError::unavailable(what.to_owned(), err)
}

impl Store for LvTagStore {
    fn keeps_io_limits(&self) -> bool {
        false
    }

    /// Snapshots are objects of the cluster's.
    fn keeps_snapshots(&self) -> bool {
        false
    }

    async fn get(&self, id: &VolumeId) -> Result<Option<Volume>, StoreError> {
        let local = self
            .volumes
            .get(id.as_str())
            .await
            .map_err(unavailable("reading logical volumes"))?;
        local.map(|local| self.volume(local)).transpose()
    }

    async fn create(&self, volume: NewVolume) -> Result<Volume, StoreError> {
        if !volume.io_limits.is_none() {
            return Err(no_io_limits());
        }
        let request = VolumeRequest {
            id: volume.id.to_string(),
            media: volume.media,
            size_bytes: volume.size_bytes,
            access: match volume.access {
                Access::Block => "block".to_owned(),
                Access::Filesystem(fs) => fs.to_string(),
            },
            pvc: volume
                .pvc
                .as_ref()
                .map(|pvc| format!("{}/{}", pvc.namespace, pvc.name)),
            thin: volume.thin,
            origin: None,
            snapshot: false,
        };
        match self.volumes.ensure(&request).await {
            Ok(local) => self.volume(local),
            // Out of space: a failed volume, so the caller answers RESOURCE_EXHAUSTED.
            Err(err @ (VolumeError::NoSpace { .. } | VolumeError::NoGroup(_))) => Ok(Volume {
                id: volume.id,
                node: volume.node,
                media: volume.media,
                access: volume.access,
                size_bytes: volume.size_bytes,
                state: VolumeState::Failed {
                    message: err.to_string(),
                    lv_exists: false,
                },
                actual_bytes: None,
                generation: 1,
                condition: None,
                io_limits: IoLimits::NONE,
                thin: volume.thin,
                snapshot_of: None,
                source: None,
                created_seconds: None,
            }),
            Err(err) => Err(StoreError::unavailable("creating the logical volume", err)),
        }
    }

    async fn wait(&self, volume: &Volume, _deadline: Instant) -> Result<Volume, StoreError> {
        Ok(volume.clone())
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), StoreError> {
        self.volumes
            .remove(id.as_str())
            .await
            .map_err(unavailable("removing the logical volume"))
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StoreError> {
        match self.volumes.expand(volume.id.as_str(), size_bytes).await {
            Ok(Some(local)) => self.volume(local),
            Ok(None) => Err(StoreError::Corrupt(format!(
                "volume {} vanished",
                volume.id
            ))),
            Err(err @ VolumeError::NoSpace { .. }) => Ok(Volume {
                state: VolumeState::Failed {
                    message: err.to_string(),
                    lv_exists: true,
                },
                size_bytes,
                ..volume.clone()
            }),
            Err(err) => Err(StoreError::unavailable("extending the logical volume", err)),
        }
    }

    async fn modify(&self, _: &Volume, _: IoLimits) -> Result<Volume, StoreError> {
        Err(no_io_limits())
    }

    async fn list(
        &self,
        after: Option<&VolumeId>,
        limit: usize,
        snapshots: bool,
    ) -> Result<Vec<Volume>, StoreError> {
        if snapshots {
            return Ok(Vec::new());
        }
        self.volumes
            .list()
            .await
            .map_err(unavailable("reading logical volumes"))?
            .into_iter()
            .filter(|local| after.is_none_or(|after| local.id.as_str() > after.as_str()))
            .take(limit)
            .map(|local| self.volume(local))
            .collect()
    }

    async fn capacities(&self, media: MediaClass) -> Result<Vec<NodeCapacity>, StoreError> {
        let space = self
            .volumes
            .space(media)
            .await
            .map_err(unavailable("reading volume groups"))?;
        Ok(space
            .map(|space| NodeCapacity {
                node: self.node.clone(),
                total_bytes: space.size_bytes,
                reported_free_bytes: space.free_bytes,
                // Its own figure already counts everything LVM holds.
                allocated_bytes: space.size_bytes - space.free_bytes,
                unaccounted_bytes: 0,
                thin_free_bytes: space.thin_free_bytes,
                extent_bytes: space.extent_bytes,
                degraded: space.missing_pvs > 0,
                silent: None,
            })
            .into_iter()
            .collect())
    }
}

/// Standalone, there is no LogicalVolume to keep the limits in and no kubelet
/// to say which pods use a volume.
fn no_io_limits() -> StoreError {
    StoreError::Unsupported(
        "IO limits are kept and enforced in a cluster only; the standalone agent has no IO limits"
            .into(),
    )
}
