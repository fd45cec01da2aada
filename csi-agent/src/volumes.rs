//! The node's volumes: logical volumes carrying lvmlocal's tag in the volume
//! groups of this agent, named by their volume id. LVs without the tag are
//! never touched. Operations on one volume group are serialized; different
//! groups proceed in parallel.
//!
//! An LV's life is recorded in its tags, so a crash at any point leaves a
//! state the next call finishes instead of guessing at it: `creating` (made,
//! not yet erased, so it may still show an earlier tenant's blocks), `ready`,
//! and `deleting` (its removal was asked: it is zeroed whole, then removed).
//! Only `ready` LVs are ever handed out. A lookup that meets a `creating` LV
//! erases it and marks it ready first; one that meets a `deleting` LV
//! finishes the removal. Every change runs in a task of its own, so a caller
//! that goes away (a cancelled RPC, shutdown) does not cut it short; shutdown
//! waits for them with [`Volumes::drain`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{ThinPoolStatus, VolumeCondition};
use lvmlocal_proto::extent::round_up;
use lvmlocal_proto::thin::Ratio;
use tokio::sync::watch;

use crate::config::DiscoveryConfig;
use crate::erase::Eraser;
use crate::kernel_log::{DeviceErrors, KernelErrors};
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
/// Where the LV is in its life: `creating`, `ready` or `deleting`.
pub const STATE_TAG: &str = "lvmlocal.io/state=";
/// A thin volume's overprovisioning ratio in hundredths: what it is charged
/// against its group is its size divided by that.
pub const THIN_TAG: &str = "lvmlocal.io/thin=";
/// The LV a volume was made from as a thin snapshot: a restore's snapshot,
/// a clone's volume, a snapshot's volume. Its blocks are the content.
pub const ORIGIN_TAG: &str = "lvmlocal.io/origin=";
/// Marks a snapshot: read-only, charged nothing, never published.
pub const SNAPSHOT_TAG: &str = "lvmlocal.io/snapshot";
/// The thin pool of each volume group, made by the first thin volume. The
/// underscore keeps it apart from every volume id.
pub const THIN_POOL: &str = "lvmlocal_thinpool";
/// The smallest thin pool metadata: LVM's own minimum is 2 MiB.
const MIN_POOL_METADATA: u64 = 4 << 20;
/// The largest thin pool metadata LVM supports, rounded down.
const MAX_POOL_METADATA: u64 = 15 << 30;

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
    #[error(
        "the source {origin} of volume {id} is not a ready thin volume or snapshot of this node's {media} group"
    )]
    NoOrigin {
        id: String,
        origin: String,
        media: MediaClass,
    },
    #[error(transparent)]
    Lvm(#[from] LvmError),
}

/// An LV's recorded state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LvState {
    Creating,
    Ready,
    Deleting,
    /// A state tag this agent does not know (a newer agent's, or a hand's):
    /// neither used, erased nor removed.
    Unknown(String),
}

impl LvState {
    /// The state `tags` record. No state tag is an LV made before states
    /// were recorded, by an lvcreate that wiped it itself: ready.
    pub fn of(tags: &[String]) -> Self {
        match tags.iter().find_map(|tag| tag.strip_prefix(STATE_TAG)) {
            None | Some("ready") => LvState::Ready,
            Some("creating") => LvState::Creating,
            Some("deleting") => LvState::Deleting,
            Some(other) => LvState::Unknown(other.to_owned()),
        }
    }

    /// The tag recording this state.
    pub fn tag(&self) -> String {
        let name = match self {
            LvState::Creating => "creating",
            LvState::Ready => "ready",
            LvState::Deleting => "deleting",
            LvState::Unknown(name) => name,
        };
        format!("{STATE_TAG}{name}")
    }
}

/// The calls that meet LVs in some state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Get,
    List,
    /// Ensure or expand: the volume is to be used.
    Ensure,
    Remove,
}

/// What a call does with an LV it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Hand it out as it is.
    Use,
    /// Erase it and mark it ready, then hand it out.
    Finish,
    /// Leave it out of the answer.
    Skip,
    /// Zero and remove it: its removal was asked, now or before.
    Remove,
    /// Refuse the call and change nothing.
    Refuse,
}

/// The one rule for LVs in each state: only a ready LV is handed out; a
/// creating one holds nobody's data yet, so it may always be erased; a
/// deleting one is finished off whenever it is looked up or removed again,
/// and never made usable again.
fn step(state: &LvState, call: Call) -> Step {
    match (state, call) {
        (LvState::Ready, Call::Remove) | (LvState::Creating, Call::Remove) => Step::Remove,
        (LvState::Ready, _) => Step::Use,
        (LvState::Creating, _) => Step::Finish,
        (LvState::Deleting, Call::Get | Call::Remove) => Step::Remove,
        (LvState::Deleting, Call::List) => Step::Skip,
        (LvState::Deleting, Call::Ensure) => Step::Refuse,
        (LvState::Unknown(_), Call::List) => Step::Skip,
        (LvState::Unknown(_), _) => Step::Refuse,
    }
}

/// The error a call refused by [`step`] answers.
fn refusal(entry: &Entry) -> VolumeError {
    let (vg, name) = (entry.volume.vg.clone(), entry.volume.id.clone());
    match &entry.state {
        LvState::Deleting => LvmError::Removing { vg, name },
        state => LvmError::UnknownState {
            vg,
            name,
            tag: state.tag(),
        },
    }
    .into()
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
    /// A thin volume's overprovisioning ratio; None for a thick one.
    pub thin: Option<Ratio>,
    /// The LV to make it a thin snapshot of: its content.
    pub origin: Option<String>,
    /// A read-only snapshot of `origin`.
    pub snapshot: bool,
}

/// The condition reason of a volume whose device the kernel logged errors
/// for.
pub const FILESYSTEM_ERRORS: &str = "FilesystemErrors";

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
    /// Its device-mapper device (`dm-3`) while active, as LVM last said.
    pub dm_name: Option<String>,
    /// Filesystem or I/O errors the kernel logged for that device.
    pub kernel_errors: Option<DeviceErrors>,
    /// A thin volume's overprovisioning ratio; None for a thick one.
    pub thin: Option<Ratio>,
    /// The LV it was made from as a thin snapshot.
    pub origin: Option<String>,
    pub snapshot: bool,
}

impl LocalVolume {
    /// What the volume takes from its volume group: its size, or a thin
    /// volume's size over its ratio.
    /// A snapshot shares its origin's blocks: nothing.
    pub fn charged_bytes(&self) -> u64 {
        match self.thin {
            _ if self.snapshot => 0,
            Some(ratio) => ratio.charge(self.size_bytes),
            None => self.size_bytes,
        }
    }

    /// The volume's health as the cluster is told it.
    pub fn condition(&self) -> VolumeCondition {
        if !self.healthy {
            return VolumeCondition::abnormal(
                "VolumeUnhealthy",
                format!(
                    "the LV {} is inactive, or LVM reports it partial (a disk of its volume \
                     group is missing) or in need of repair",
                    self.device_path
                ),
            );
        }
        match &self.kernel_errors {
            None => VolumeCondition::healthy(),
            Some(errors) => VolumeCondition::abnormal(
                FILESYSTEM_ERRORS,
                format!(
                    "the kernel logged {} filesystem or I/O error(s) for {}, the last: {}; \
                     unmount it and check it (e2fsck -f, xfs_repair)",
                    errors.count, self.device_path, errors.last
                ),
            ),
        }
    }
}

/// Room in one volume group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSpace {
    pub size_bytes: u64,
    pub free_bytes: u64,
    /// The thin pool's data no thin volume's charge takes: room for thin
    /// volumes only.
    pub thin_free_bytes: u64,
    pub extent_bytes: u64,
    pub missing_pvs: u32,
}

/// What takes room in the volume group of one media class: each of
/// lvmlocal's LVs (in any state, being made or removed too), and the LVs
/// that are not lvmlocal's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupUse {
    /// `(volume id, bytes charged)`.
    pub volumes: Vec<(String, u64)>,
    /// LVs that are not lvmlocal's, and what the thin pool holds beyond
    /// the charges of its thin volumes.
    pub other_bytes: u64,
    pub pool: Option<ThinPoolStatus>,
}

/// An LV of the index: the volume it is, and where it is in its life.
#[derive(Debug, Clone)]
struct Entry {
    volume: LocalVolume,
    state: LvState,
    /// The state tag the LV carries (none on LVs older than states), which
    /// a change of state drops.
    state_tag: Option<String>,
    active: bool,
}

/// What LVM said, kept true by this agent's own changes: it is the only
/// writer of its tagged LVs, so one `lvs` and one `vgs` after start (or after
/// anything went wrong, or the groups grew) are enough; the periodic rescan
/// reads them again for what others did.
#[derive(Debug, Default)]
struct Index {
    volumes: BTreeMap<String, Entry>,
    groups: HashMap<String, Group>,
}

impl Index {
    /// What a change behind the agent's back would show in: each volume
    /// as the cluster is told it.
    /// What tells that LVM changed behind the agent's back. A volume the
    /// agent just made is recorded before its device name is known: that
    /// name coming in is no change.
    fn summary(&self) -> Vec<LocalVolume> {
        self.volumes
            .values()
            .map(|entry| LocalVolume {
                dm_name: None,
                ..entry.volume.clone()
            })
            .collect()
    }
}

/// A volume group as `vgs` read it, the bytes its LVs that are neither
/// lvmlocal's volumes nor its thin pool take, and its thin pool.
#[derive(Debug, Clone, Copy)]
struct Group {
    size_bytes: u64,
    extent_bytes: u64,
    missing_pvs: u32,
    other_bytes: u64,
    pool: Option<Pool>,
}

/// A thin pool as `lvs` read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pool {
    data_bytes: u64,
    metadata_bytes: u64,
    /// Hundredths of a percent.
    data_percent: u32,
    metadata_percent: u32,
}

impl Pool {
    /// What the pool takes from its group: data, metadata, and LVM's spare
    /// copy of the metadata for repairs.
    fn footprint(&self) -> u64 {
        self.data_bytes + 2 * self.metadata_bytes
    }

    fn status(&self, virtual_bytes: u64, charged: u64) -> ThinPoolStatus {
        let used = u128::from(self.data_bytes) * u128::from(self.data_percent) / 10_000;
        ThinPoolStatus {
            name: THIN_POOL.to_owned(),
            data_bytes: self.data_bytes,
            data_used_bytes: u64::try_from(used).unwrap_or(u64::MAX),
            data_percent: self.data_percent.div_ceil(100),
            metadata_bytes: self.metadata_bytes,
            metadata_percent: self.metadata_percent.div_ceil(100),
            virtual_bytes,
            free_bytes: self.data_bytes.saturating_sub(charged),
        }
    }

    fn of(lv: &Lv) -> Self {
        Pool {
            data_bytes: lv.size_bytes,
            metadata_bytes: lv.metadata_bytes.unwrap_or(0),
            data_percent: lv.data_percent.unwrap_or(0),
            metadata_percent: lv.metadata_percent.unwrap_or(0),
        }
    }
}

/// The metadata a new thin pool gets: enough to map every block of the
/// whole volume group at LVM's default chunk size (a pool may grow into
/// all of it), within LVM's bounds.
pub fn pool_metadata_bytes(group_bytes: u64, extent_bytes: u64) -> u64 {
    round_up(
        (group_bytes / 512).clamp(MIN_POOL_METADATA, MAX_POOL_METADATA),
        extent_bytes,
    )
}

impl Index {
    /// Room in `vg`: what neither its volumes nor other LVs take. Derived
    /// from the volumes each time, so a volume recorded twice (by a change
    /// and by a rebuild that read it) is counted once.
    fn space(&self, vg: &str) -> Option<GroupSpace> {
        let group = self.groups.get(vg)?;
        let own: u64 = self
            .volumes
            .values()
            .filter(|entry| entry.volume.vg == vg && entry.volume.thin.is_none())
            .map(|entry| entry.volume.size_bytes)
            .sum();
        let pool = group.pool.as_ref().map_or(0, Pool::footprint);
        let thin_free_bytes = group.pool.as_ref().map_or(0, |pool| {
            pool.data_bytes.saturating_sub(self.thin_use(vg).0)
        });
        Some(GroupSpace {
            thin_free_bytes,
            size_bytes: group.size_bytes,
            free_bytes: group
                .size_bytes
                .saturating_sub(group.other_bytes.saturating_add(own).saturating_add(pool)),
            extent_bytes: group.extent_bytes,
            missing_pvs: group.missing_pvs,
        })
    }

    /// What the thin volumes of `vg` are charged in all, and their sizes.
    fn thin_use(&self, vg: &str) -> (u64, u64) {
        self.volumes
            .values()
            .filter(|entry| {
                entry.volume.vg == vg && entry.volume.thin.is_some() && !entry.volume.snapshot
            })
            .fold((0, 0), |(charged, size), entry| {
                (
                    charged + entry.volume.charged_bytes(),
                    size + entry.volume.size_bytes,
                )
            })
    }
}

/// The index, a count of the changes made to it or behind it, and the
/// changes of LVM's space running now: a rebuild that a change overlapped
/// cannot install what it read.
#[derive(Debug, Default)]
struct Cache {
    index: Option<Index>,
    generation: u64,
    changing: usize,
}

/// An LVM command that changes a group's space is running: see [`Cache`].
struct Changing<'a>(&'a Mutex<Cache>);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        let mut cache = self.0.lock().expect("index poisoned");
        cache.changing -= 1;
        cache.generation += 1;
    }
}

/// Rebuilds of the index raced by changes before one result is used as it is.
const REBUILD_ATTEMPTS: usize = 5;

pub struct Volumes {
    shared: Arc<Shared>,
    /// Changes running in their own tasks.
    in_flight: Arc<watch::Sender<usize>>,
}

/// Counts a change out of [`Volumes::in_flight`] however its task ends.
struct InFlight(Arc<watch::Sender<usize>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

impl Volumes {
    /// Volumes of the groups `config` names, with what the kernel logs
    /// about their devices from `kernel`.
    pub fn new(lvm: Lvm, config: &DiscoveryConfig, kernel: KernelErrors) -> Self {
        Self {
            shared: Arc::new(Shared {
                kernel,
                eraser: Eraser::new(lvm.runner().clone()),
                lvm,
                groups: config
                    .classes
                    .iter()
                    .map(|media| (*media, config.vg_name(*media)))
                    .collect(),
                locks: Mutex::default(),
                cache: Mutex::default(),
                rebuild: tokio::sync::Mutex::default(),
                lv_changes: watch::channel(0).0,
            }),
            in_flight: Arc::new(watch::channel(0).0),
        }
    }

    /// Runs a change to `volume` in a task of its own: it runs to its end
    /// (each command bounded by the runner's timeout) even if the caller's
    /// future is dropped.
    async fn change<T, F>(
        &self,
        volume: &str,
        change: impl FnOnce(Arc<Shared>) -> F,
    ) -> Result<T, VolumeError>
    where
        F: Future<Output = Result<T, VolumeError>> + Send + 'static,
        T: Send + 'static,
    {
        self.in_flight.send_modify(|count| *count += 1);
        let counted = InFlight(self.in_flight.clone());
        let change = change(self.shared.clone());
        let task = tokio::spawn(async move {
            let _counted = counted;
            change.await
        });
        match task.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => Err(LvmError::Interrupted {
                volume: volume.to_owned(),
            }
            .into()),
        }
    }

    /// Waits up to `timeout` for the changes in flight to end; false if
    /// some still run (they resume from their recorded state next time).
    pub async fn drain(&self, timeout: Duration) -> bool {
        let mut count = self.in_flight.subscribe();
        tokio::time::timeout(timeout, count.wait_for(|count| *count == 0))
            .await
            .is_ok()
    }

    /// Forgets what LVM said; the next call asks again. For when the volume
    /// groups changed under the index (a disk joined) or a command failed.
    pub fn invalidate(&self) {
        self.shared.invalidate();
    }

    /// Moves each time a refresh finds the volumes changed behind the
    /// agent's back.
    pub fn lv_changes(&self) -> watch::Receiver<u64> {
        self.shared.lv_changes.subscribe()
    }

    /// Reads LVM afresh, for what was changed behind the agent's back, and
    /// installs it unless one of the agent's own changes overlapped the
    /// read (the next refresh catches up then). Whether it was installed.
    pub async fn refresh(&self) -> Result<bool, VolumeError> {
        self.shared.refresh().await
    }

    /// Room left in the volume group of `media`, if this node has one.
    pub async fn space(&self, media: MediaClass) -> Result<Option<GroupSpace>, VolumeError> {
        let Some(vg) = self.shared.vg(media) else {
            return Ok(None);
        };
        self.shared.with_index(|index| index.space(vg)).await
    }

    /// What takes room in each volume group of this node.
    pub async fn usage(&self) -> Result<Vec<(MediaClass, GroupUse)>, VolumeError> {
        let shared = &self.shared;
        shared
            .with_index(|index| {
                index
                    .groups
                    .iter()
                    .filter_map(|(vg, group)| {
                        let volumes = index
                            .volumes
                            .values()
                            .filter(|entry| entry.volume.vg == *vg)
                            .map(|entry| (entry.volume.id.clone(), entry.volume.charged_bytes()))
                            .collect();
                        let (thin_charged, virtual_bytes) = index.thin_use(vg);
                        let slack = group
                            .pool
                            .map_or(0, |pool| pool.footprint().saturating_sub(thin_charged));
                        let usage = GroupUse {
                            volumes,
                            other_bytes: group.other_bytes + slack,
                            pool: group
                                .pool
                                .map(|pool| pool.status(virtual_bytes, thin_charged)),
                        };
                        Some((shared.media(vg)?, usage))
                    })
                    .collect()
            })
            .await
    }

    /// Reads each thin pool's fill afresh and grows a pool whose data or
    /// metadata is [`POOL_GROW_PERCENT`] full into its group's free space:
    /// its data by a quarter, its metadata to twice its size. What it did,
    /// for the node's events.
    pub async fn tend_pools(&self) -> Result<Vec<String>, VolumeError> {
        let mut done = Vec::new();
        for (_, vg) in &self.shared.groups {
            done.extend(self.shared.tend_pool(vg).await?);
        }
        Ok(done)
    }

    /// Every usable lvmlocal volume on this node, sorted by id.
    pub async fn list(&self) -> Result<Vec<LocalVolume>, VolumeError> {
        let entries = self
            .shared
            .with_index(|index| index.volumes.values().cloned().collect::<Vec<_>>())
            .await?;
        let mut volumes = Vec::with_capacity(entries.len());
        for entry in entries {
            match step(&entry.state, Call::List) {
                Step::Use => volumes.push(entry.volume),
                Step::Finish => volumes.extend(self.finish(&entry.volume.id).await?),
                Step::Skip | Step::Remove | Step::Refuse => {}
            }
        }
        Ok(volumes)
    }

    /// The volume, if it is on this node and usable.
    pub async fn get(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        let Some(entry) = self.shared.entry(id).await? else {
            return Ok(None);
        };
        match step(&entry.state, Call::Get) {
            Step::Use => Ok(Some(entry.volume)),
            Step::Finish => self.finish(id).await,
            Step::Remove => self.remove(id).await.map(|()| None),
            Step::Skip => Ok(None),
            Step::Refuse => Err(refusal(&entry)),
        }
    }

    /// Erases a `creating` LV a lookup met and marks it ready.
    async fn finish(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        let id = id.to_owned();
        self.change(&id.clone(), |shared| async move {
            shared.finish_found(&id).await
        })
        .await
    }

    /// The volume as LVM reports it right now, with the filesystem recorded
    /// on it: one `lvs` of its group, leaving the index as it is. A decision
    /// to format reads LVM, not what the index remembers.
    pub async fn inspect_formatted(
        &self,
        id: &str,
    ) -> Result<Option<(LocalVolume, Option<String>)>, VolumeError> {
        let Some(known) = self.get(id).await? else {
            return Ok(None);
        };
        let lvs = self.shared.lvm.lvs(Some(&known.vg)).await?;
        Ok(lvs.iter().filter(|lv| lv.name == id).find_map(|lv| {
            let entry = self.shared.entry_of(lv)?;
            let formatted = lv.tag_value(FORMATTED_TAG).map(str::to_owned);
            (entry.state == LvState::Ready).then_some((entry.volume, formatted))
        }))
    }

    /// Records that the volume holds a filesystem of `fs` made by lvmlocal.
    pub async fn mark_formatted(&self, volume: &LocalVolume, fs: &str) -> Result<(), VolumeError> {
        let _serial = self.shared.lock(&volume.vg).await;
        self.shared
            .lvm
            .add_lv_tag(&volume.vg, &volume.id, &format!("{FORMATTED_TAG}{fs}"))
            .await?;
        Ok(())
    }

    /// Makes the volume exist with at least the requested size: creates it,
    /// grows it, or finds it already so. Safe to repeat. Without room for it,
    /// nothing is created.
    pub async fn ensure(&self, request: &VolumeRequest) -> Result<LocalVolume, VolumeError> {
        let request = request.clone();
        self.change(&request.id.clone(), |shared| async move {
            shared.ensure(&request).await
        })
        .await
    }

    /// Grows the volume to at least `size_bytes`; never shrinks it.
    pub async fn expand(
        &self,
        id: &str,
        size_bytes: u64,
    ) -> Result<Option<LocalVolume>, VolumeError> {
        let id = id.to_owned();
        self.change(&id.clone(), |shared| async move {
            shared.expand(&id, size_bytes).await
        })
        .await
    }

    /// Zeroes the volume whole and removes it; an unknown id is already
    /// removed.
    pub async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        let id = id.to_owned();
        self.change(
            &id.clone(),
            |shared| async move { shared.remove(&id).await },
        )
        .await
    }
}

/// A thin pool this full (in hundredths of a percent), in data or in
/// metadata, is grown if its group has room.
pub const POOL_GROW_PERCENT: u32 = 8_000;

/// What the tasks of [`Volumes`] share.
struct Shared {
    lvm: Lvm,
    eraser: Eraser,
    groups: Vec<(MediaClass, String)>,
    /// One per volume group (by its name) and one per volume being removed
    /// (`<vg>/<id>`). A task takes a volume's before its group's.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cache: Mutex<Cache>,
    /// Held while LVM is read for the index: callers that need the index
    /// meanwhile wait for that read instead of starting their own.
    rebuild: tokio::sync::Mutex<()>,
    /// Bumped when a refresh installs volumes that differ from those it
    /// replaced: LVM changed behind the agent's back.
    lv_changes: watch::Sender<u64>,
    kernel: KernelErrors,
}

impl Shared {
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

    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .expect("lock table poisoned")
            .entry(key.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn invalidate(&self) {
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

    fn changing(&self) -> Changing<'_> {
        let mut cache = self.cache.lock().expect("index poisoned");
        cache.changing += 1;
        cache.generation += 1;
        Changing(&self.cache)
    }

    /// The generation a rebuild starting now must still find to install
    /// what it reads; None while a change of space is running.
    fn quiet_generation(&self) -> Option<u64> {
        let cache = self.cache.lock().expect("index poisoned");
        (cache.changing == 0).then_some(cache.generation)
    }

    /// Installs `fresh` if nothing changed since `started`; hands it back
    /// otherwise.
    fn install(&self, started: Option<u64>, fresh: Index) -> Result<(), Index> {
        let mut cache = self.cache.lock().expect("index poisoned");
        if started.is_some_and(|g| g == cache.generation && cache.changing == 0) {
            cache.index = Some(fresh);
            Ok(())
        } else {
            Err(fresh)
        }
    }

    /// Runs `f` on the index, reading it from LVM first if needed.
    async fn with_index<R>(&self, f: impl FnOnce(&mut Index) -> R) -> Result<R, VolumeError> {
        if let Some(index) = self.cache.lock().expect("index poisoned").index.as_mut() {
            return Ok(f(index));
        }
        let _rebuilding = self.rebuild.lock().await;
        let mut attempt = 0;
        loop {
            let started = {
                let mut cache = self.cache.lock().expect("index poisoned");
                if let Some(index) = cache.index.as_mut() {
                    return Ok(f(index));
                }
                (cache.changing == 0).then_some(cache.generation)
            };
            let fresh = self.read_index().await?;
            attempt += 1;
            {
                let mut cache = self.cache.lock().expect("index poisoned");
                if let Some(index) = cache.index.as_mut() {
                    return Ok(f(index));
                }
            }
            match self.install(started, fresh) {
                Ok(()) => {
                    let mut cache = self.cache.lock().expect("index poisoned");
                    let index = cache.index.as_mut().expect("just installed");
                    return Ok(f(index));
                }
                Err(mut fresh) if attempt == REBUILD_ATTEMPTS => return Ok(f(&mut fresh)),
                Err(_) => {}
            }
        }
    }

    async fn refresh(&self) -> Result<bool, VolumeError> {
        let _rebuilding = self.rebuild.lock().await;
        let started = self.quiet_generation();
        let fresh = self.read_index().await?;
        let after = fresh.summary();
        let before = {
            let cache = self.cache.lock().expect("index poisoned");
            cache.index.as_ref().map(Index::summary)
        };
        let installed = self.install(started, fresh).is_ok();
        // After an invalidation nothing is known to compare with: tell.
        if installed && before.as_ref() != Some(&after) {
            self.lv_changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(installed)
    }

    async fn read_index(&self) -> Result<Index, VolumeError> {
        let lvs = self.lvm.lvs(None).await?;
        let vgs = self.lvm.vgs().await?;
        let volumes: BTreeMap<String, Entry> = lvs
            .iter()
            .filter_map(|lv| self.entry_of(lv))
            .map(|entry| (entry.volume.id.clone(), entry))
            .collect();
        let groups = vgs
            .into_iter()
            .filter(|vg| self.media(&vg.name).is_some())
            .map(|vg| {
                let own: u64 = volumes
                    .values()
                    .filter(|entry| entry.volume.vg == vg.name && entry.volume.thin.is_none())
                    .map(|entry| entry.volume.size_bytes)
                    .sum();
                let pool = lvs
                    .iter()
                    .find(|lv| lv.vg == vg.name && lv.name == THIN_POOL && lv.thin_pool())
                    .map(Pool::of);
                let used = vg.size_bytes.saturating_sub(vg.free_bytes);
                let group = Group {
                    size_bytes: vg.size_bytes,
                    extent_bytes: vg.extent_bytes,
                    missing_pvs: vg.missing_pvs,
                    other_bytes: used
                        .saturating_sub(own)
                        .saturating_sub(pool.as_ref().map_or(0, Pool::footprint)),
                    pool,
                };
                (vg.name, group)
            })
            .collect();
        Ok(Index { volumes, groups })
    }

    fn entry_of(&self, lv: &Lv) -> Option<Entry> {
        if !lv.tags.iter().any(|tag| tag == VOLUME_TAG) {
            return None;
        }
        let media = self.media(&lv.vg)?;
        let attr: Vec<char> = lv.attr.chars().collect();
        let dm_name = lv.kernel_minor.map(|minor| format!("dm-{minor}"));
        let volume = LocalVolume {
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
            healthy: lv.active() && attr.get(8).is_none_or(|h| *h == '-'),
            // Device-mapper names its devices by minor number.
            dm_name: dm_name.clone(),
            kernel_errors: dm_name.and_then(|name| self.kernel.of(&name)),
            thin: lv.pool.as_ref().map(|_| {
                lv.tag_value(THIN_TAG)
                    .and_then(|percent| percent.parse().ok())
                    .and_then(Ratio::from_percent)
                    .unwrap_or(Ratio::ONE)
            }),
            origin: lv.tag_value(ORIGIN_TAG).map(str::to_owned),
            snapshot: lv.tags.iter().any(|tag| tag == SNAPSHOT_TAG),
        };
        Some(Entry {
            volume,
            state: LvState::of(&lv.tags),
            state_tag: lv
                .tags
                .iter()
                .find(|tag| tag.starts_with(STATE_TAG))
                .cloned(),
            active: lv.active(),
        })
    }

    async fn entry(&self, id: &str) -> Result<Option<Entry>, VolumeError> {
        self.with_index(|index| index.volumes.get(id).cloned())
            .await
    }

    /// Puts `entry` in the index; its size counts against its group's room.
    fn record(&self, entry: Entry) {
        self.apply(|index| {
            index.volumes.insert(entry.volume.id.clone(), entry);
        });
    }

    /// Finishes the `creating` LV `id` a lookup met, unless another task
    /// did first; the volume if it is usable then.
    async fn finish_found(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        let Some(entry) = self.entry(id).await? else {
            return Ok(None);
        };
        let _volume = self.lock(&volume_key(&entry.volume.vg, id)).await;
        let Some(entry) = self.entry(id).await? else {
            return Ok(None);
        };
        match entry.state {
            LvState::Ready => Ok(Some(entry.volume)),
            LvState::Creating => self.finish_create(entry).await.map(Some),
            LvState::Deleting | LvState::Unknown(_) => Ok(None),
        }
    }

    /// Erases a `creating` LV (every signature, both ends) and marks it
    /// ready. The caller holds the volume's lock; the group's is not
    /// needed, since neither step changes the group's free space.
    async fn finish_create(&self, entry: Entry) -> Result<LocalVolume, VolumeError> {
        let volume = entry.volume;
        let (vg, id) = (volume.vg.as_str(), volume.id.as_str());
        let ready = LvState::Ready.tag();
        let result = async {
            if !entry.active {
                self.lvm.activate(vg, id).await?;
            }
            // A thin volume's pool zeroes each block before the volume
            // first sees it: there is nothing earlier to erase. A copy's
            // blocks are its content.
            if volume.thin.is_none() && volume.origin.is_none() {
                self.eraser
                    .wipe_new(&volume.device_path, volume.size_bytes)
                    .await?;
            }
            self.lvm
                .set_tags(vg, id, entry.state_tag.as_deref(), &ready)
                .await
        }
        .await;
        if let Err(err) = result {
            self.invalidate();
            return Err(err.into());
        }
        tracing::info!(volume = id, vg, "LV erased and marked ready");
        if !entry.active {
            // Its health is read afresh now that it is active.
            self.invalidate();
        }
        self.record(Entry {
            volume: volume.clone(),
            state: LvState::Ready,
            state_tag: Some(ready),
            active: true,
        });
        Ok(volume)
    }

    async fn ensure(&self, request: &VolumeRequest) -> Result<LocalVolume, VolumeError> {
        let vg = self
            .vg(request.media)
            .ok_or(VolumeError::NoGroup(request.media))?
            .to_owned();
        // The volume's lock for the whole create, the group's only while
        // its free space is read and taken: the erase of one new LV does
        // not hold up the creates of the others.
        let _volume = self.lock(&volume_key(&vg, &request.id)).await;
        let serial = self.lock(&vg).await;
        if let Some(entry) = self.entry(&request.id).await? {
            if entry.volume.media != request.media {
                return Err(VolumeError::OtherMedia {
                    id: request.id.clone(),
                    existing: entry.volume.media,
                    wanted: request.media,
                });
            }
            return self.settled(entry, request.size_bytes).await;
        }
        let space = self
            .with_index(|index| index.space(&vg))
            .await?
            .ok_or(VolumeError::NoGroup(request.media))?;
        let size_bytes = round_up(request.size_bytes, space.extent_bytes);
        let origin = match &request.origin {
            Some(origin) => Some(self.origin(&vg, request, origin).await?),
            None => None,
        };
        match request.thin {
            Some(_) if request.snapshot => {}
            None if space.free_bytes < size_bytes => {
                return Err(VolumeError::NoSpace {
                    media: request.media,
                    needed: size_bytes,
                    free: space.free_bytes,
                });
            }
            None => {}
            Some(ratio) => {
                self.make_room_in_pool(&vg, request.media, ratio.charge(size_bytes))
                    .await?;
            }
        }
        let mut tags = vec![
            VOLUME_TAG.to_owned(),
            LvState::Creating.tag(),
            format!("{REQUESTED_TAG}{}", request.size_bytes),
            format!("{ACCESS_TAG}{}", request.access),
        ];
        tags.extend(request.pvc.iter().map(|pvc| format!("{PVC_TAG}{pvc}")));
        tags.extend(
            request
                .thin
                .map(|ratio| format!("{THIN_TAG}{}", ratio.percent())),
        );
        tags.extend(
            request
                .origin
                .as_ref()
                .map(|origin| format!("{ORIGIN_TAG}{origin}")),
        );
        if request.snapshot {
            tags.push(SNAPSHOT_TAG.to_owned());
        }
        let changing = self.changing();
        let created = match (&origin, request.thin) {
            (Some(origin), _) => {
                self.lvm
                    .thin_snapshot(&vg, &origin.id, &request.id, request.snapshot, &tags)
                    .await
            }
            (None, None) => {
                self.lvm
                    .lvcreate(&vg, &request.id, request.size_bytes, &tags)
                    .await
            }
            (None, Some(_)) => {
                self.lvm
                    .lvcreate_thin(&vg, THIN_POOL, &request.id, request.size_bytes, &tags)
                    .await
            }
        };
        if let Err(err) = created {
            drop(changing);
            self.invalidate();
            return Err(self.explain(err, &vg, request.media, size_bytes).await);
        }
        let entry = Entry {
            volume: LocalVolume {
                id: request.id.clone(),
                media: request.media,
                device_path: format!("/dev/{vg}/{}", request.id),
                vg: vg.clone(),
                // A snapshot is its origin's size until grown.
                size_bytes: origin
                    .as_ref()
                    .map_or(size_bytes, |origin| origin.size_bytes),
                requested_bytes: request.size_bytes,
                access: request.access.clone(),
                pvc: request.pvc.clone(),
                healthy: true,
                dm_name: None,
                kernel_errors: None,
                thin: request.thin,
                origin: request.origin.clone(),
                snapshot: request.snapshot,
            },
            state: LvState::Creating,
            state_tag: Some(LvState::Creating.tag()),
            active: true,
        };
        self.record(entry.clone());
        drop(changing);
        drop(serial);
        let volume = self.finish_create(entry).await?;
        if volume.size_bytes >= request.size_bytes || request.snapshot {
            return Ok(volume);
        }
        let _serial = self.lock(&vg).await;
        self.grow(&volume, request.size_bytes).await
    }

    /// The ready thin volume or snapshot of `vg` a new LV is to copy.
    async fn origin(
        &self,
        vg: &str,
        request: &VolumeRequest,
        origin: &str,
    ) -> Result<LocalVolume, VolumeError> {
        match self.entry(origin).await? {
            Some(entry)
                if entry.volume.vg == vg
                    && entry.volume.thin.is_some()
                    && entry.state == LvState::Ready =>
            {
                Ok(entry.volume)
            }
            _ => Err(VolumeError::NoOrigin {
                id: request.id.clone(),
                origin: origin.to_owned(),
                media: request.media,
            }),
        }
    }

    /// The usable volume an existing LV is, at least `size_bytes` large:
    /// finished if it was being created, grown if smaller. The caller holds
    /// its group's lock.
    async fn settled(&self, entry: Entry, size_bytes: u64) -> Result<LocalVolume, VolumeError> {
        let volume = match step(&entry.state, Call::Ensure) {
            Step::Use => entry.volume,
            Step::Finish => self.finish_create(entry).await?,
            Step::Skip | Step::Remove | Step::Refuse => return Err(refusal(&entry)),
        };
        if volume.size_bytes >= size_bytes {
            return Ok(volume);
        }
        self.grow(&volume, size_bytes).await
    }

    async fn expand(&self, id: &str, size_bytes: u64) -> Result<Option<LocalVolume>, VolumeError> {
        let Some(entry) = self.entry(id).await? else {
            return Ok(None);
        };
        let _volume = self.lock(&volume_key(&entry.volume.vg, id)).await;
        let _serial = self.lock(&entry.volume.vg).await;
        let Some(entry) = self.entry(id).await? else {
            return Ok(None);
        };
        self.settled(entry, size_bytes).await.map(Some)
    }

    async fn grow(
        &self,
        volume: &LocalVolume,
        size_bytes: u64,
    ) -> Result<LocalVolume, VolumeError> {
        let space = self
            .with_index(|index| index.space(&volume.vg))
            .await?
            .ok_or(VolumeError::NoGroup(volume.media))?;
        let new_size = round_up(size_bytes, space.extent_bytes);
        let extra = new_size - volume.size_bytes;
        match volume.thin {
            None if space.free_bytes < extra => {
                return Err(VolumeError::NoSpace {
                    media: volume.media,
                    needed: extra,
                    free: space.free_bytes,
                });
            }
            None => {}
            Some(ratio) => {
                let more = ratio.charge(new_size) - ratio.charge(volume.size_bytes);
                self.make_room_in_pool(&volume.vg, volume.media, more)
                    .await?;
            }
        }
        let changing = self.changing();
        if let Err(err) = self.lvm.lvextend(&volume.vg, &volume.id, size_bytes).await {
            drop(changing);
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
        self.record(Entry {
            volume: grown.clone(),
            state: LvState::Ready,
            state_tag: Some(LvState::Ready.tag()),
            active: true,
        });
        Ok(grown)
    }

    /// Marks the LV `deleting`, zeroes it whole and removes it. Zeroing
    /// holds only the volume's own lock: creates in its group go on
    /// meanwhile, and its extents stay taken until lvremove.
    async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        let Some(entry) = self.entry(id).await? else {
            return Ok(());
        };
        let vg = entry.volume.vg.clone();
        let _volume = self.lock(&volume_key(&vg, id)).await;
        let entry = {
            let _serial = self.lock(&vg).await;
            let Some(entry) = self.entry(id).await? else {
                return Ok(());
            };
            if step(&entry.state, Call::Remove) != Step::Remove {
                return Err(refusal(&entry));
            }
            if entry.state == LvState::Deleting {
                entry
            } else {
                match self.mark_deleting(entry).await? {
                    Some(entry) => entry,
                    None => return Ok(()),
                }
            }
        };
        let volume = &entry.volume;
        // Zeroing a thin volume would only fill its pool: its blocks go back
        // to the pool, which zeroes each before the next volume sees it.
        if volume.thin.is_none() {
            if !entry.active {
                self.lvm.activate(&vg, id).await?;
            }
            self.eraser
                .zero_whole(&volume.device_path, volume.size_bytes)
                .await
                .map_err(LvmError::from)?;
        }
        let _serial = self.lock(&vg).await;
        let _changing = self.changing();
        if let Err(err) = self.lvm.lvremove(&vg, id).await {
            self.invalidate();
            return Err(err.into());
        }
        // The next LV may get the same device name; its errors are its own.
        if let Some(dm_name) = &volume.dm_name {
            self.kernel.forget(dm_name);
        }
        tracing::info!(
            volume = id,
            vg,
            bytes = volume.size_bytes,
            thin = volume.thin.is_some(),
            "LV zeroed (thick) and removed"
        );
        self.apply(|index| {
            index.volumes.remove(id);
        });
        Ok(())
    }

    /// Records that the LV's removal was asked, unless it is open: zeroing
    /// it would destroy what a mount still uses. None if LVM has no such LV
    /// after all. The caller holds its group's lock.
    async fn mark_deleting(&self, entry: Entry) -> Result<Option<Entry>, VolumeError> {
        let (vg, id) = (&entry.volume.vg, &entry.volume.id);
        let lvs = self.lvm.lvs(Some(vg)).await?;
        let Some(lv) = lvs.iter().find(|lv| &lv.name == id) else {
            self.invalidate();
            return Ok(None);
        };
        if lv.open() {
            return Err(LvmError::Open {
                vg: vg.clone(),
                name: id.clone(),
            }
            .into());
        }
        let deleting = LvState::Deleting.tag();
        if let Err(err) = self
            .lvm
            .set_tags(vg, id, entry.state_tag.as_deref(), &deleting)
            .await
        {
            self.invalidate();
            return Err(err.into());
        }
        let entry = Entry {
            state: LvState::Deleting,
            state_tag: Some(deleting),
            active: lv.active(),
            ..entry
        };
        self.record(entry.clone());
        Ok(Some(entry))
    }

    /// Makes the thin pool of `vg` large enough for its thin volumes to be
    /// charged `more` bytes more: creates it, or grows its data. A pool
    /// never shrinks (LVM cannot), so what it holds beyond its volumes'
    /// charges stays taken. The caller holds the group's lock.
    async fn make_room_in_pool(
        &self,
        vg: &str,
        media: MediaClass,
        more: u64,
    ) -> Result<(), VolumeError> {
        let (space, pool, charged) = self
            .with_index(|index| {
                (
                    index.space(vg),
                    index.groups.get(vg).and_then(|group| group.pool),
                    index.thin_use(vg).0,
                )
            })
            .await?;
        let space = space.ok_or(VolumeError::NoGroup(media))?;
        let wanted = round_up(charged + more, space.extent_bytes);
        let changing = self.changing();
        let result = match pool {
            None => {
                let metadata = pool_metadata_bytes(space.size_bytes, space.extent_bytes);
                let needed = wanted + 2 * metadata;
                if space.free_bytes < needed {
                    return Err(VolumeError::NoSpace {
                        media,
                        needed,
                        free: space.free_bytes,
                    });
                }
                tracing::info!(vg, data = wanted, metadata, "creating the thin pool");
                self.lvm
                    .create_thin_pool(vg, THIN_POOL, wanted, metadata)
                    .await
            }
            Some(pool) if pool.data_bytes < wanted => {
                let needed = wanted - pool.data_bytes;
                if space.free_bytes < needed {
                    return Err(VolumeError::NoSpace {
                        media,
                        needed,
                        free: space.free_bytes,
                    });
                }
                tracing::info!(
                    vg,
                    from = pool.data_bytes,
                    to = wanted,
                    "growing the thin pool"
                );
                self.lvm.lvextend(vg, THIN_POOL, wanted).await
            }
            Some(_) => return Ok(()),
        };
        drop(changing);
        // The pool's new figures are read from LVM.
        self.invalidate();
        Ok(result?)
    }

    async fn tend_pool(&self, vg: &str) -> Result<Vec<String>, VolumeError> {
        let _serial = self.lock(vg).await;
        let known = self
            .with_index(|index| index.groups.get(vg).is_some_and(|g| g.pool.is_some()))
            .await?;
        if !known {
            return Ok(Vec::new());
        }
        let lvs = self.lvm.lvs(Some(vg)).await?;
        let Some(pool_lv) = lvs.iter().find(|lv| lv.name == THIN_POOL && lv.thin_pool()) else {
            self.invalidate();
            return Ok(Vec::new());
        };
        // A crash between making the pool and setting this left it queueing.
        if !pool_lv.errors_when_full {
            self.lvm.fail_writes_when_full(vg, THIN_POOL).await?;
        }
        let pool = Pool::of(pool_lv);
        self.apply(|index| {
            if let Some(group) = index.groups.get_mut(vg) {
                group.pool = Some(pool);
            }
        });
        if pool.data_percent < POOL_GROW_PERCENT && pool.metadata_percent < POOL_GROW_PERCENT {
            return Ok(Vec::new());
        }
        let Some(space) = self.with_index(|index| index.space(vg)).await? else {
            return Ok(Vec::new());
        };
        let extent = space.extent_bytes.max(1);
        let mut free = space.free_bytes / extent * extent;
        let mut done = Vec::new();
        let _changing = self.changing();
        if pool.metadata_percent >= POOL_GROW_PERCENT {
            let room = MAX_POOL_METADATA.saturating_sub(pool.metadata_bytes);
            let more = pool
                .metadata_bytes
                .min(room)
                .min(free / 2 / extent * extent);
            if more > 0 {
                // The spare grows with it: twice the growth is taken.
                let to = pool.metadata_bytes + more;
                let result = self.lvm.extend_pool_metadata(vg, THIN_POOL, to).await;
                self.invalidate();
                result?;
                free -= 2 * more;
                done.push(format!(
                    "thin pool {vg}/{THIN_POOL} metadata grown from {} to {to} bytes",
                    pool.metadata_bytes
                ));
            }
        }
        if pool.data_percent >= POOL_GROW_PERCENT {
            let more = round_up(pool.data_bytes / 4, extent).min(free);
            if more > 0 {
                let to = pool.data_bytes + more;
                let result = self.lvm.lvextend(vg, THIN_POOL, to).await;
                self.invalidate();
                result?;
                done.push(format!(
                    "thin pool {vg}/{THIN_POOL} data grown from {} to {to} bytes",
                    pool.data_bytes
                ));
            }
        }
        for note in &done {
            tracing::info!(vg, "{note}");
        }
        Ok(done)
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
        if let Ok(space) = self.with_index(|index| index.space(vg)).await
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
    fn usage(
        &self,
    ) -> impl Future<Output = Result<Vec<(MediaClass, GroupUse)>, VolumeError>> + Send;
    /// See [`Volumes::tend_pools`].
    fn tend_pools(&self) -> impl Future<Output = Result<Vec<String>, VolumeError>> + Send;
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

    async fn usage(&self) -> Result<Vec<(MediaClass, GroupUse)>, VolumeError> {
        Volumes::usage(self).await
    }

    async fn tend_pools(&self) -> Result<Vec<String>, VolumeError> {
        Volumes::tend_pools(self).await
    }
}

/// The lock key of one volume, beside its group's: a group's name holds no
/// `/`, so the two never meet.
fn volume_key(vg: &str, id: &str) -> String {
    format!("{vg}/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_unhealthy_first_then_has_filesystem_errors() {
        let mut volume = crate::fake_lvm::local("v", MediaClass::Ssd, 1 << 30);
        assert!(!volume.condition().abnormal);
        volume.kernel_errors = Some(DeviceErrors {
            count: 2,
            last: "EXT4-fs error (device dm-3): boom".into(),
        });
        let condition = volume.condition();
        assert!(condition.abnormal);
        assert_eq!(condition.reason, FILESYSTEM_ERRORS);
        assert!(
            condition.message.contains("2 filesystem or I/O error(s)")
                && condition
                    .message
                    .contains("EXT4-fs error (device dm-3): boom"),
            "{condition:?}"
        );
        volume.healthy = false;
        assert_eq!(volume.condition().reason, "VolumeUnhealthy");
    }

    /// A volume the agent just made is recorded without its device name;
    /// the refresh that learns the name is not a change behind its back.
    #[test]
    fn learning_the_device_name_is_no_change() {
        let entry = |dm_name: Option<&str>| Entry {
            volume: LocalVolume {
                dm_name: dm_name.map(str::to_owned),
                ..crate::fake_lvm::local("v", MediaClass::Ssd, 1 << 30)
            },
            state: LvState::Ready,
            state_tag: None,
            active: true,
        };
        let index = |entry: Entry| Index {
            volumes: [("v".to_owned(), entry)].into(),
            groups: HashMap::new(),
        };
        assert_eq!(
            index(entry(None)).summary(),
            index(entry(Some("dm-3"))).summary()
        );
    }

    fn tags(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|tag| tag.to_string()).collect()
    }

    #[test]
    fn the_state_is_read_from_the_tags() {
        let state = |t: &[&str]| LvState::of(&tags(t));
        assert_eq!(state(&[VOLUME_TAG]), LvState::Ready, "made before states");
        assert_eq!(
            state(&[VOLUME_TAG, "lvmlocal.io/state=ready"]),
            LvState::Ready
        );
        assert_eq!(
            state(&["lvmlocal.io/state=creating", VOLUME_TAG]),
            LvState::Creating
        );
        assert_eq!(state(&["lvmlocal.io/state=deleting"]), LvState::Deleting);
        assert_eq!(
            state(&["lvmlocal.io/state=frozen"]),
            LvState::Unknown("frozen".into())
        );
        for known in [LvState::Creating, LvState::Ready, LvState::Deleting] {
            assert_eq!(LvState::of(&[known.tag()]), known);
        }
    }

    #[test]
    fn only_a_ready_lv_is_handed_out() {
        use LvState::*;
        let unknown = Unknown("frozen".into());
        for call in [Call::Get, Call::List, Call::Ensure] {
            assert_eq!(step(&Ready, call), Step::Use);
            // Nobody has written to it yet: erasing it again loses nothing.
            assert_eq!(step(&Creating, call), Step::Finish);
            assert_ne!(step(&Deleting, call), Step::Use);
            assert_ne!(step(&unknown, call), Step::Use);
        }
        assert_eq!(step(&Ready, Call::Remove), Step::Remove);
        assert_eq!(step(&Creating, Call::Remove), Step::Remove);
    }

    #[test]
    fn a_deleting_lv_is_finished_off_never_revived() {
        use LvState::*;
        assert_eq!(step(&Deleting, Call::Remove), Step::Remove);
        assert_eq!(step(&Deleting, Call::Get), Step::Remove);
        assert_eq!(step(&Deleting, Call::List), Step::Skip);
        assert_eq!(step(&Deleting, Call::Ensure), Step::Refuse);
    }

    #[test]
    fn an_unknown_state_is_left_alone() {
        let unknown = LvState::Unknown("frozen".into());
        assert_eq!(step(&unknown, Call::Remove), Step::Refuse);
        assert_eq!(step(&unknown, Call::Ensure), Step::Refuse);
        assert_eq!(step(&unknown, Call::Get), Step::Refuse);
        assert_eq!(step(&unknown, Call::List), Step::Skip);
        let entry = Entry {
            volume: crate::fake_lvm::local("v", MediaClass::Nvme, 1 << 30),
            state: unknown,
            state_tag: Some("lvmlocal.io/state=frozen".into()),
            active: true,
        };
        assert_eq!(
            refusal(&entry).to_string(),
            "LV lvmlocal-nvme/v carries the tag lvmlocal.io/state=frozen, a state this agent does not know; left alone"
        );
    }

    fn entry(id: &str, size: u64) -> Entry {
        Entry {
            volume: crate::fake_lvm::local(id, MediaClass::Nvme, size),
            state: LvState::Ready,
            state_tag: Some(LvState::Ready.tag()),
            active: true,
        }
    }

    /// An index as a rebuild reads it: `other` bytes of LVs not lvmlocal's.
    fn index(volumes: &[Entry], other: u64) -> Index {
        let vg = "lvmlocal-nvme".to_owned();
        Index {
            volumes: volumes
                .iter()
                .map(|entry| (entry.volume.id.clone(), entry.clone()))
                .collect(),
            groups: [(
                vg,
                Group {
                    size_bytes: 10 << 30,
                    extent_bytes: 4 << 20,
                    missing_pvs: 0,
                    other_bytes: other,
                    pool: None,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn thin_volumes_take_their_charge_from_the_pool_and_the_pool_its_footprint() {
        const GIB: u64 = 1 << 30;
        let mut thin = entry("thin", 4 * GIB);
        thin.volume.thin = Ratio::from_percent(400);
        let mut index = index(&[entry("thick", GIB), thin], 0);
        let group = index.groups.get_mut("lvmlocal-nvme").unwrap();
        group.pool = Some(Pool {
            data_bytes: 2 * GIB,
            metadata_bytes: 4 << 20,
            data_percent: 2_500,
            metadata_percent: 100,
        });
        let space = index.space("lvmlocal-nvme").unwrap();
        // 10 GiB less the thick volume and the pool with its metadata and
        // spare; the thin volume's 4 GiB are inside the pool.
        assert_eq!(space.free_bytes, 7 * GIB - (8 << 20));
        // The pool backs 2 GiB; the thin volume is charged 1 GiB of it.
        assert_eq!(space.thin_free_bytes, GIB);
        assert_eq!(index.thin_use("lvmlocal-nvme"), (GIB, 4 * GIB));
        let status = Pool {
            data_bytes: 2 * GIB,
            metadata_bytes: 4 << 20,
            data_percent: 2_501,
            metadata_percent: 100,
        }
        .status(4 * GIB, GIB);
        assert_eq!(status.data_used_bytes, 2 * GIB * 2_501 / 10_000);
        assert_eq!(status.data_percent, 26, "rounded up");
        assert_eq!(status.free_bytes, GIB);
        assert_eq!(status.virtual_bytes, 4 * GIB);
    }

    #[test]
    fn pool_metadata_covers_the_group_within_lvms_bounds() {
        let extent = 4 << 20;
        assert_eq!(pool_metadata_bytes(1 << 30, extent), MIN_POOL_METADATA);
        assert_eq!(pool_metadata_bytes(1 << 40, extent), 2 << 30);
        assert_eq!(pool_metadata_bytes(1 << 50, extent), MAX_POOL_METADATA);
        assert_eq!(pool_metadata_bytes(3 << 30, extent) % extent, 0);
    }

    #[test]
    fn a_volume_recorded_twice_takes_its_room_once() {
        let mut index = index(&[entry("a", 1 << 30)], 2 << 30);
        let free = |index: &Index| index.space("lvmlocal-nvme").unwrap().free_bytes;
        assert_eq!(free(&index), 7 << 30);
        // A rebuild already read the new LV; the change records it again.
        for _ in 0..2 {
            index.volumes.insert("b".into(), entry("b", 3 << 30));
            assert_eq!(free(&index), 4 << 30);
        }
        index.volumes.remove("a");
        assert_eq!(free(&index), 5 << 30);
        assert!(index.space("lvmlocal-ssd").is_none());
    }

    fn shared() -> Shared {
        let volumes = Volumes::new(
            Lvm::default(),
            &DiscoveryConfig::default(),
            KernelErrors::default(),
        );
        Arc::try_unwrap(volumes.shared).ok().expect("one owner")
    }

    fn installed(shared: &Shared) -> Option<Vec<String>> {
        let cache = shared.cache.lock().unwrap();
        cache
            .index
            .as_ref()
            .map(|index| index.volumes.keys().cloned().collect())
    }

    #[test]
    fn a_rebuild_a_change_overlapped_is_not_installed() {
        let shared = shared();
        // The read began before the change and ended during it.
        let started = shared.quiet_generation();
        let changing = shared.changing();
        let read = index(&[], 0);
        assert!(shared.install(started, read).is_err());
        // The read began during the change and ended after it.
        let started = shared.quiet_generation();
        assert_eq!(started, None);
        drop(changing);
        assert!(shared.install(started, index(&[], 0)).is_err());
        // A change recorded between the start of a read and its end.
        let started = shared.quiet_generation();
        shared.apply(|_| {});
        assert!(shared.install(started, index(&[], 0)).is_err());
        assert_eq!(installed(&shared), None);
        // Nothing in between: installed, and what the change did stays.
        let started = shared.quiet_generation();
        assert!(
            shared
                .install(started, index(&[entry("a", 1 << 30)], 0))
                .is_ok()
        );
        assert_eq!(installed(&shared), Some(vec!["a".to_owned()]));
    }

    #[tokio::test]
    async fn a_change_outlives_its_dropped_caller_and_shutdown_waits_for_it() {
        let volumes = Arc::new(Volumes::new(
            Lvm::default(),
            &DiscoveryConfig::default(),
            KernelErrors::default(),
        ));
        let (started, is_started) = tokio::sync::oneshot::channel();
        let (finish, finishing) = tokio::sync::oneshot::channel::<()>();
        let (done, is_done) = tokio::sync::oneshot::channel();
        let caller = volumes.clone();
        let call = tokio::spawn(async move {
            let _ = caller
                .change("v", move |_| async move {
                    started.send(()).unwrap();
                    finishing.await.unwrap();
                    done.send(()).unwrap();
                    Ok(())
                })
                .await;
        });
        is_started.await.unwrap();
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        assert!(
            !volumes.drain(Duration::from_millis(50)).await,
            "still running"
        );
        finish.send(()).unwrap();
        assert!(volumes.drain(Duration::from_secs(5)).await);
        is_done.await.expect("the change ran to its end");
    }
}
