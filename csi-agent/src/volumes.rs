//! The node's volumes: logical volumes carrying lvmlocal's tag in the volume
//! groups of this agent, named by their volume id. LVs without the tag are
//! never touched. Operations on one volume group are serialized; different
//! groups proceed in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lvmlocal_proto::MediaClass;

use crate::config::DiscoveryConfig;
use crate::lvm::{Lv, Lvm, LvmError};

/// Marks an LV as lvmlocal's.
pub const VOLUME_TAG: &str = "lvmlocal.io/volume";
/// The size asked for, before LVM rounded it up to whole extents.
pub const REQUESTED_TAG: &str = "lvmlocal.io/requested=";
/// `ext4`, `xfs` or `block`.
pub const ACCESS_TAG: &str = "lvmlocal.io/access=";
/// `<namespace>/<name>` of the PVC the volume serves.
pub const PVC_TAG: &str = "lvmlocal.io/pvc=";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("this node has no {0} volume group")]
    NoGroup(MediaClass),
    #[error("{media}: needs {needed} bytes, {free} free")]
    NoSpace {
        media: MediaClass,
        needed: u64,
        free: u64,
    },
    #[error("volume {id} already exists on {existing} media, not {wanted}")]
    OtherMedia {
        id: String,
        existing: MediaClass,
        wanted: MediaClass,
    },
    #[error(transparent)]
    Lvm(#[from] LvmError),
}

/// What a volume should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    pub id: String,
    pub media: MediaClass,
    pub size_bytes: u64,
    /// `ext4`, `xfs` or `block`.
    pub access: String,
    /// `<namespace>/<name>`.
    pub pvc: Option<String>,
}

/// A volume as it is on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    pub id: String,
    pub media: MediaClass,
    pub vg: String,
    /// Actual size of the LV.
    pub size_bytes: u64,
    pub requested_bytes: u64,
    pub access: String,
    pub pvc: Option<String>,
    pub device_path: String,
    /// `lv_attr` reports it active and without a health problem.
    pub healthy: bool,
}

pub struct Volumes {
    lvm: Lvm,
    groups: Vec<(MediaClass, String)>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Volumes {
    pub fn new(lvm: Lvm, config: &DiscoveryConfig) -> Self {
        Self {
            lvm,
            groups: config
                .classes
                .iter()
                .map(|media| (*media, config.vg_name(*media)))
                .collect(),
            locks: Mutex::default(),
        }
    }

    fn vg(&self, media: MediaClass) -> Option<&str> {
        self.groups
            .iter()
            .find(|(class, _)| *class == media)
            .map(|(_, vg)| vg.as_str())
    }

    fn media(&self, vg: &str) -> Option<MediaClass> {
        self.groups
            .iter()
            .find(|(_, name)| name == vg)
            .map(|(media, _)| *media)
    }

    async fn lock(&self, vg: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .expect("lock table poisoned")
            .entry(vg.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn local(&self, lv: &Lv) -> Option<LocalVolume> {
        if !lv.tags.iter().any(|tag| tag == VOLUME_TAG) {
            return None;
        }
        let media = self.media(&lv.vg)?;
        let attr: Vec<char> = lv.attr.chars().collect();
        Some(LocalVolume {
            id: lv.name.clone(),
            media,
            vg: lv.vg.clone(),
            size_bytes: lv.size_bytes,
            requested_bytes: lv
                .tag_value(REQUESTED_TAG)
                .and_then(|bytes| bytes.parse().ok())
                .unwrap_or(lv.size_bytes),
            access: lv.tag_value(ACCESS_TAG).unwrap_or("block").to_owned(),
            pvc: lv.tag_value(PVC_TAG).map(str::to_owned),
            device_path: lv.path.clone(),
            // State 'a'ctive, health '-' (no partial, refresh or mismatch).
            healthy: attr.get(4) == Some(&'a') && attr.get(8).is_none_or(|h| *h == '-'),
        })
    }

    /// Every lvmlocal volume on this node, sorted by id.
    pub async fn list(&self) -> Result<Vec<LocalVolume>, VolumeError> {
        let mut volumes: Vec<LocalVolume> = self
            .lvm
            .lvs(None)
            .await?
            .iter()
            .filter_map(|lv| self.local(lv))
            .collect();
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    pub async fn get(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|volume| volume.id == id))
    }

    /// Makes the volume exist with at least the requested size: creates it,
    /// grows it, or finds it already so. Safe to repeat.
    pub async fn ensure(&self, request: &VolumeRequest) -> Result<LocalVolume, VolumeError> {
        let vg = self
            .vg(request.media)
            .ok_or(VolumeError::NoGroup(request.media))?
            .to_owned();
        let _serial = self.lock(&vg).await;
        if let Some(existing) = self.get(&request.id).await? {
            if existing.media != request.media {
                return Err(VolumeError::OtherMedia {
                    id: request.id.clone(),
                    existing: existing.media,
                    wanted: request.media,
                });
            }
            if existing.size_bytes >= request.size_bytes {
                return Ok(existing);
            }
            return self.grow(&existing, request.size_bytes).await;
        }
        let mut tags = vec![
            VOLUME_TAG.to_owned(),
            format!("{REQUESTED_TAG}{}", request.size_bytes),
            format!("{ACCESS_TAG}{}", request.access),
        ];
        tags.extend(request.pvc.iter().map(|pvc| format!("{PVC_TAG}{pvc}")));
        if let Err(err) = self
            .lvm
            .lvcreate(&vg, &request.id, request.size_bytes, &tags)
            .await
        {
            return Err(self
                .explain(err, &vg, request.media, request.size_bytes)
                .await);
        }
        self.get(&request.id)
            .await?
            .ok_or(VolumeError::NoGroup(request.media))
    }

    /// Grows the volume to at least `size_bytes`; never shrinks it.
    pub async fn expand(
        &self,
        id: &str,
        size_bytes: u64,
    ) -> Result<Option<LocalVolume>, VolumeError> {
        let Some(existing) = self.get(id).await? else {
            return Ok(None);
        };
        let _serial = self.lock(&existing.vg).await;
        if existing.size_bytes >= size_bytes {
            return Ok(Some(existing));
        }
        self.grow(&existing, size_bytes).await.map(Some)
    }

    async fn grow(
        &self,
        volume: &LocalVolume,
        size_bytes: u64,
    ) -> Result<LocalVolume, VolumeError> {
        if let Err(err) = self.lvm.lvextend(&volume.vg, &volume.id, size_bytes).await {
            let extra = size_bytes - volume.size_bytes;
            return Err(self.explain(err, &volume.vg, volume.media, extra).await);
        }
        let (old, new) = (
            format!("{REQUESTED_TAG}{}", volume.requested_bytes),
            format!("{REQUESTED_TAG}{size_bytes}"),
        );
        self.lvm
            .retag_lv(&volume.vg, &volume.id, &old, &new)
            .await?;
        self.get(&volume.id)
            .await?
            .ok_or(VolumeError::NoGroup(volume.media))
    }

    /// Removes the volume; an unknown id is already removed.
    pub async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        let Some(existing) = self.get(id).await? else {
            return Ok(());
        };
        let _serial = self.lock(&existing.vg).await;
        self.lvm.lvremove(&existing.vg, &existing.id).await?;
        Ok(())
    }

    /// Turns LVM's "insufficient free space" into an answer an operator
    /// understands; checked after the fact so a create costs one command.
    async fn explain(
        &self,
        err: LvmError,
        vg: &str,
        media: MediaClass,
        needed: u64,
    ) -> VolumeError {
        if let Ok(state) = self.lvm.state().await
            && let Some(group) = state.vg(vg)
            && group.free_bytes < needed
        {
            return VolumeError::NoSpace {
                media,
                needed,
                free: group.free_bytes,
            };
        }
        VolumeError::Lvm(err)
    }
}
