//! The node's volumes: logical volumes carrying lvmlocal's tag in the volume
//! groups of this agent, named by their volume id. LVs without the tag are
//! never touched. Operations on one volume group are serialized; different
//! groups proceed in parallel.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::extent::round_up;

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
/// The filesystem lvmlocal made on the volume, set right after mkfs
/// succeeded: from then on a volume without a filesystem is damaged, never
/// blank.
pub const FORMATTED_TAG: &str = "lvmlocal.io/formatted=";

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

/// Room in one volume group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpace {
    pub size_bytes: u64,
    pub free_bytes: u64,
    pub extent_bytes: u64,
    pub missing_pvs: u32,
}

/// What LVM said, kept true by this agent's own changes: it is the only
/// writer of its tagged LVs, so one `lvs` and one `vgs` after start (or after
/// anything went wrong, or the groups grew) are enough, and a create costs
/// one LVM command.
#[derive(Debug, Default)]
struct Index {
    volumes: BTreeMap<String, LocalVolume>,
    groups: HashMap<String, GroupSpace>,
}

/// The index and a count of the changes made to it or behind it, so a
/// rebuild that read LVM before a change cannot install what it read.
#[derive(Debug, Default)]
struct Cache {
    index: Option<Index>,
    generation: u64,
}

/// Rebuilds of the index raced by changes before one result is used as it is.
const REBUILD_ATTEMPTS: usize = 5;

pub struct Volumes {
    lvm: Lvm,
    groups: Vec<(MediaClass, String)>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cache: Mutex<Cache>,
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
            cache: Mutex::default(),
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

    /// Forgets what LVM said; the next call asks again. For when the volume
    /// groups changed under the index (a disk joined) or a command failed.
    pub fn invalidate(&self) {
        let mut cache = self.cache.lock().expect("index poisoned");
        cache.index = None;
        cache.generation += 1;
    }

    /// Applies this agent's own change to the index. Without an index there
    /// is nothing to change: the next rebuild reads the change from LVM, and
    /// a rebuild already reading is told to read again.
    fn apply(&self, change: impl FnOnce(&mut Index)) {
        let mut cache = self.cache.lock().expect("index poisoned");
        cache.generation += 1;
        if let Some(index) = cache.index.as_mut() {
            change(index);
        }
    }

    /// Runs `f` on the index, reading it from LVM first if needed.
    async fn with_index<R>(&self, f: impl FnOnce(&mut Index) -> R) -> Result<R, VolumeError> {
        let mut attempt = 0;
        loop {
            let generation = {
                let mut cache = self.cache.lock().expect("index poisoned");
                if let Some(index) = cache.index.as_mut() {
                    return Ok(f(index));
                }
                cache.generation
            };
            let mut fresh = self.read_index().await?;
            attempt += 1;
            let mut cache = self.cache.lock().expect("index poisoned");
            if let Some(index) = cache.index.as_mut() {
                return Ok(f(index));
            }
            if cache.generation == generation {
                return Ok(f(cache.index.insert(fresh)));
            }
            if attempt == REBUILD_ATTEMPTS {
                return Ok(f(&mut fresh));
            }
        }
    }

    async fn read_index(&self) -> Result<Index, VolumeError> {
        let lvs = self.lvm.lvs(None).await?;
        let vgs = self.lvm.vgs().await?;
        Ok(Index {
            volumes: lvs
                .iter()
                .filter_map(|lv| self.local(lv))
                .map(|volume| (volume.id.clone(), volume))
                .collect(),
            groups: vgs
                .into_iter()
                .filter(|vg| self.media(&vg.name).is_some())
                .map(|vg| {
                    let space = GroupSpace {
                        size_bytes: vg.size_bytes,
                        free_bytes: vg.free_bytes,
                        extent_bytes: vg.extent_bytes,
                        missing_pvs: vg.missing_pvs,
                    };
                    (vg.name, space)
                })
                .collect(),
        })
    }

    /// Room left in the volume group of `media`, if this node has one.
    pub async fn space(&self, media: MediaClass) -> Result<Option<GroupSpace>, VolumeError> {
        let Some(vg) = self.vg(media) else {
            return Ok(None);
        };
        self.with_index(|index| index.groups.get(vg).copied()).await
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
        self.with_index(|index| index.volumes.values().cloned().collect())
            .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        self.with_index(|index| index.volumes.get(id).cloned())
            .await
    }

    /// The volume as LVM reports it right now, health included: one `lvs` of
    /// its group, leaving the index as it is.
    pub async fn inspect(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        Ok(self.inspect_formatted(id).await?.map(|(volume, _)| volume))
    }

    /// [`Volumes::inspect`], with the filesystem recorded on the volume: a
    /// decision to format reads LVM, not what the index remembers.
    pub async fn inspect_formatted(
        &self,
        id: &str,
    ) -> Result<Option<(LocalVolume, Option<String>)>, VolumeError> {
        let Some(known) = self.get(id).await? else {
            return Ok(None);
        };
        let lvs = self.lvm.lvs(Some(&known.vg)).await?;
        Ok(lvs.iter().filter(|lv| lv.name == id).find_map(|lv| {
            let formatted = lv.tag_value(FORMATTED_TAG).map(str::to_owned);
            Some((self.local(lv)?, formatted))
        }))
    }

    /// Records that the volume holds a filesystem of `fs` made by lvmlocal.
    pub async fn mark_formatted(&self, volume: &LocalVolume, fs: &str) -> Result<(), VolumeError> {
        let _serial = self.lock(&volume.vg).await;
        self.lvm
            .add_lv_tag(&volume.vg, &volume.id, &format!("{FORMATTED_TAG}{fs}"))
            .await?;
        Ok(())
    }

    /// Makes the volume exist with at least the requested size: creates it,
    /// grows it, or finds it already so. Safe to repeat. Without room for it,
    /// nothing is created.
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
        let space = self
            .with_index(|index| index.groups.get(&vg).copied())
            .await?
            .ok_or(VolumeError::NoGroup(request.media))?;
        let size_bytes = round_up(request.size_bytes, space.extent_bytes);
        if space.free_bytes < size_bytes {
            return Err(VolumeError::NoSpace {
                media: request.media,
                needed: size_bytes,
                free: space.free_bytes,
            });
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
            self.invalidate();
            return Err(self.explain(err, &vg, request.media, size_bytes).await);
        }
        let volume = LocalVolume {
            id: request.id.clone(),
            media: request.media,
            device_path: format!("/dev/{vg}/{}", request.id),
            vg: vg.clone(),
            size_bytes,
            requested_bytes: request.size_bytes,
            access: request.access.clone(),
            pvc: request.pvc.clone(),
            healthy: true,
        };
        self.record(&vg, &volume, size_bytes as i128);
        Ok(volume)
    }

    /// Puts `volume` in the index and takes `used` bytes (negative: gives
    /// them back) from its group's free space.
    fn record(&self, vg: &str, volume: &LocalVolume, used: i128) {
        self.apply(|index| {
            index.volumes.insert(volume.id.clone(), volume.clone());
            if let Some(space) = index.groups.get_mut(vg) {
                space.free_bytes = (i128::from(space.free_bytes) - used).max(0) as u64;
            }
        });
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
        let Some(existing) = self.get(id).await? else {
            return Ok(None);
        };
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
        let space = self
            .with_index(|index| index.groups.get(&volume.vg).copied())
            .await?
            .ok_or(VolumeError::NoGroup(volume.media))?;
        let new_size = round_up(size_bytes, space.extent_bytes);
        let extra = new_size - volume.size_bytes;
        if space.free_bytes < extra {
            return Err(VolumeError::NoSpace {
                media: volume.media,
                needed: extra,
                free: space.free_bytes,
            });
        }
        if let Err(err) = self.lvm.lvextend(&volume.vg, &volume.id, size_bytes).await {
            self.invalidate();
            return Err(self.explain(err, &volume.vg, volume.media, extra).await);
        }
        let (old, new) = (
            format!("{REQUESTED_TAG}{}", volume.requested_bytes),
            format!("{REQUESTED_TAG}{size_bytes}"),
        );
        if let Err(err) = self.lvm.retag_lv(&volume.vg, &volume.id, &old, &new).await {
            self.invalidate();
            return Err(err.into());
        }
        let grown = LocalVolume {
            size_bytes: new_size,
            requested_bytes: size_bytes,
            ..volume.clone()
        };
        self.record(&volume.vg, &grown, extra as i128);
        Ok(grown)
    }

    /// Removes the volume; an unknown id is already removed.
    pub async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        let Some(existing) = self.get(id).await? else {
            return Ok(());
        };
        let _serial = self.lock(&existing.vg).await;
        if let Err(err) = self.lvm.lvremove(&existing.vg, &existing.id).await {
            self.invalidate();
            return Err(err.into());
        }
        self.apply(|index| {
            if index.volumes.remove(id).is_some()
                && let Some(space) = index.groups.get_mut(&existing.vg)
            {
                space.free_bytes += existing.size_bytes;
            }
        });
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
        if let Ok(space) = self.with_index(|index| index.groups.get(vg).copied()).await
            && let Some(space) = space
            && space.free_bytes < needed
        {
            return VolumeError::NoSpace {
                media,
                needed,
                free: space.free_bytes,
            };
        }
        VolumeError::Lvm(err)
    }
}

/// The LV operations the reconciler and the orphan audit need: [`Volumes`]
/// on a node, or a fake in their tests.
pub trait VolumeBackend: Send + Sync + 'static {
    fn list(&self) -> impl Future<Output = Result<Vec<LocalVolume>, VolumeError>> + Send;
    fn get(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<LocalVolume>, VolumeError>> + Send;
    fn ensure(
        &self,
        request: &VolumeRequest,
    ) -> impl Future<Output = Result<LocalVolume, VolumeError>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), VolumeError>> + Send;
}

impl VolumeBackend for Volumes {
    async fn list(&self) -> Result<Vec<LocalVolume>, VolumeError> {
        Volumes::list(self).await
    }

    async fn get(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        Volumes::get(self, id).await
    }

    async fn ensure(&self, request: &VolumeRequest) -> Result<LocalVolume, VolumeError> {
        Volumes::ensure(self, request).await
    }

    async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        Volumes::remove(self, id).await
    }
}
