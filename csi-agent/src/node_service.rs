//! The CSI Node service: stage (format only what is positively blank and
//! never formatted, mount), publish (bind mount, or the device file for raw
//! block), stats, online expansion. Every argument is checked before
//! anything runs; every call can be repeated; a state where going on could
//! lose data or hide a mount is refused, with nothing changed.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use lvmlocal_proto::TOPOLOGY_KEY;
use lvmlocal_proto::csi::v1::node_server::Node;
use lvmlocal_proto::csi::v1::node_service_capability::{Rpc, rpc};
use lvmlocal_proto::csi::v1::volume_capability::AccessType;
use lvmlocal_proto::csi::v1::volume_usage::Unit;
use lvmlocal_proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage,
};
use lvmlocal_proto::params::POD_UID_CONTEXT;
use lvmlocal_proto::rpc::RpcMetrics;
use lvmlocal_proto::validate::{self, Invalid, Wanted};
use lvmlocal_proto::volume::{Access, FsType};
use tonic::{Code, Request, Response, Status};

use crate::fs_probe::{FsProbe, ProbeError};
use crate::io_limits::{IoLimiter, LimitError, check_uid};
use crate::metrics::Metrics;
use crate::mount::{
    MountError, Mounter, Preparation, check_readable, comma_separated, devno, mounted_at,
    mounted_elsewhere, mounts, prepare,
};
use crate::volumes::{LocalVolume, VolumeError, Volumes};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("volume context {POD_UID_CONTEXT}: {0}")]
    PodUid(LimitError),
    #[error("{what} {path:?} must be an absolute path under {kubelet_dir} without '..'")]
    OutsideKubelet {
        what: &'static str,
        path: String,
        kubelet_dir: String,
    },
    #[error("mount option {0:?} is not allowed: letters, digits and =_.:/- only")]
    MountOption(String),
    #[error("volume {0} does not exist on this node")]
    UnknownVolume(String),
    #[error("volume {id} is not at {path}")]
    NotAtPath { id: String, path: String },
    #[error("{0} is not staged: NodeStageVolume first")]
    NotStaged(String),
    #[error("{path} is already mounted from another device")]
    TakenPath { path: String },
    #[error("volume {id} is a {existing} volume, not {asked}")]
    WrongAccess {
        id: String,
        existing: String,
        asked: String,
    },
    #[error(
        "{staging} is still mounted at {others}: NodeUnpublishVolume those first; \
         nothing was unmounted"
    )]
    StillPublished { staging: String, others: String },
    #[error("{device} is already mounted at {at}: not staging it at {staging} as well")]
    MountedElsewhere {
        device: String,
        at: String,
        staging: String,
    },
    #[error("an operation on volume {0} is in progress")]
    InProgress(String),
    #[error(transparent)]
    Hung(#[from] ProbeError),
    #[error("volume {id}: {source}")]
    Precondition { id: String, source: MountError },
    #[error(transparent)]
    Mount(MountError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl From<MountError> for NodeError {
    fn from(err: MountError) -> Self {
        match err {
            MountError::Busy { target } => NodeError::TakenPath { path: target },
            err => NodeError::Mount(err),
        }
    }
}

/// A refusal to prepare `id`'s device is the volume's state, not a failure
/// of the node: FAILED_PRECONDITION, and the message names the volume.
fn refused(id: &str) -> impl FnOnce(MountError) -> NodeError + '_ {
    move |source| match source {
        MountError::OtherFilesystem { .. }
        | MountError::UnknownData { .. }
        | MountError::NeedsRepair { .. }
        | MountError::RecordedOther { .. }
        | MountError::Unreadable { .. } => NodeError::Precondition {
            id: id.to_owned(),
            source,
        },
        err => err.into(),
    }
}

impl From<NodeError> for Status {
    fn from(err: NodeError) -> Self {
        let code = match &err {
            NodeError::Invalid(invalid) => invalid.code(),
            NodeError::Missing(_)
            | NodeError::PodUid(_)
            | NodeError::OutsideKubelet { .. }
            | NodeError::MountOption(_) => Code::InvalidArgument,
            NodeError::UnknownVolume(_) | NodeError::NotAtPath { .. } => Code::NotFound,
            NodeError::NotStaged(_)
            | NodeError::Precondition { .. }
            | NodeError::StillPublished { .. }
            | NodeError::MountedElsewhere { .. } => Code::FailedPrecondition,
            NodeError::InProgress(_) => Code::Aborted,
            // The call may still finish: kubelet treats the outcome as
            // uncertain and asks again.
            NodeError::Hung(_) => Code::DeadlineExceeded,
            NodeError::TakenPath { .. } | NodeError::WrongAccess { .. } => Code::AlreadyExists,
            NodeError::Mount(_) | NodeError::Volume(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node: String,
    /// Staging and target paths must lie under it.
    pub kubelet_dir: PathBuf,
    /// Reported to kubelet; 0 means no limit.
    pub max_volumes: i64,
}

pub struct NodeService {
    settings: NodeSettings,
    volumes: Arc<Volumes>,
    mounter: Mounter,
    metrics: RpcMetrics,
    usage: Arc<Metrics>,
    busy: Busy,
    probe: FsProbe,
    limiter: Arc<IoLimiter>,
}

/// Volumes with a Node call under way. A second call for the same volume is
/// answered ABORTED (kubelet retries) rather than racing the first, e.g.
/// between one's probe and the other's mkfs.
#[derive(Debug, Default)]
struct Busy(Mutex<HashSet<String>>);

struct Claim<'a> {
    busy: &'a Busy,
    id: String,
}

impl Busy {
    fn claim(&self, id: &str) -> Result<Claim<'_>, NodeError> {
        if !self
            .0
            .lock()
            .expect("busy set poisoned")
            .insert(id.to_owned())
        {
            return Err(NodeError::InProgress(id.to_owned()));
        }
        Ok(Claim {
            busy: self,
            id: id.to_owned(),
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.busy
            .0
            .lock()
            .expect("busy set poisoned")
            .remove(&self.id);
    }
}

impl NodeService {
    pub fn new(
        settings: NodeSettings,
        volumes: Arc<Volumes>,
        mounter: Mounter,
        metrics: RpcMetrics,
        usage: Arc<Metrics>,
        limiter: Arc<IoLimiter>,
    ) -> Self {
        Self {
            settings,
            volumes,
            mounter,
            metrics,
            usage,
            busy: Busy::default(),
            probe: FsProbe::default(),
            limiter,
        }
    }

    /// Records which pod has `volume` published at `target`, holding it to
    /// the volume's IO limits. The volume works without: a failure is
    /// logged, and the limiter's next pass tries again.
    async fn record_publication(
        &self,
        volume: &LocalVolume,
        pod_uid: Option<String>,
        target: &Path,
    ) {
        let Some(pod_uid) = pod_uid else {
            return;
        };
        let limiter = self.limiter.clone();
        let (id, device, target) = (
            volume.id.clone(),
            PathBuf::from(&volume.device_path),
            target.to_owned(),
        );
        let recorded =
            tokio::task::spawn_blocking(move || limiter.published(&id, &pod_uid, &target, &device))
                .await;
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot hold the pod to the volume's IO limits")
            }
            Err(err) => tracing::warn!(error = %err, "recording the publication stopped"),
        }
    }

    /// `call` on `path`, off the async runtime and under the probe's deadline.
    async fn on_path<T: Send + 'static>(
        &self,
        path: &Path,
        call: impl FnOnce(&Path) -> Result<T, MountError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let owned = path.to_owned();
        Ok(self.probe.run(path, move || call(&owned)).await??)
    }

    fn path(&self, what: &'static str, path: &str) -> Result<PathBuf, NodeError> {
        if path.is_empty() {
            return Err(NodeError::Missing(what));
        }
        let candidate = Path::new(path);
        // Plain: no '..', and spelled as its components rebuild it (no '.', no '//').
        let clean = candidate.is_absolute()
            && candidate
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && candidate.components().collect::<PathBuf>().as_os_str() == candidate.as_os_str();
        if !clean
            || !candidate.starts_with(&self.settings.kubelet_dir)
            || candidate == self.settings.kubelet_dir
        {
            return Err(NodeError::OutsideKubelet {
                what,
                path: path.to_owned(),
                kubelet_dir: self.settings.kubelet_dir.display().to_string(),
            });
        }
        Ok(candidate.to_owned())
    }

    /// Where a stats call looks for volume `id`: a relative path cannot be
    /// where the volume is (NOT_FOUND, as the spec says); a path outside the
    /// kubelet directory is still refused.
    fn volume_path(&self, id: &str, path: &str) -> Result<PathBuf, NodeError> {
        if Path::new(path).is_relative() {
            return Err(NodeError::NotAtPath {
                id: id.to_owned(),
                path: path.to_owned(),
            });
        }
        self.path("volume_path", path)
    }

    async fn volume(&self, id: &str) -> Result<LocalVolume, NodeError> {
        let id = validate::volume_id(id)?;
        tracing::Span::current().record("volume", id.as_str());
        self.volumes
            .get(id.as_str())
            .await?
            .ok_or_else(|| NodeError::UnknownVolume(id.to_string()))
    }

    async fn stage(
        &self,
        req: NodeStageVolumeRequest,
    ) -> Result<NodeStageVolumeResponse, NodeError> {
        validate::volume_id(&req.volume_id)?;
        let staging = self.path("staging_target_path", &req.staging_target_path)?;
        let capability = req
            .volume_capability
            .ok_or(NodeError::Missing("volume_capability"))?;
        let wanted = validate::wanted(&capability)?;
        let options = mount_options(&capability)?;
        let volume = self.volume(&req.volume_id).await?;
        let access = access_for(&volume, wanted)?;
        let Access::Filesystem(fs) = access else {
            // Raw block needs nothing staged: publish exposes the device itself.
            return Ok(NodeStageVolumeResponse {});
        };
        let _claim = self.busy.claim(&volume.id)?;
        let device = volume.device_path.as_str();
        let device_no = self.on_path(Path::new(device), devno).await?;
        let mounts = self.on_path(&staging, |_| mounts()).await?;
        if let Some(mount) = mounts.iter().rev().find(|mount| mount.target == staging) {
            return if mount.devno == device_no {
                Ok(NodeStageVolumeResponse {})
            } else {
                Err(NodeError::TakenPath {
                    path: staging.display().to_string(),
                })
            };
        }
        let elsewhere = mounted_elsewhere(&mounts, &device_no, &staging);
        if !elsewhere.is_empty() {
            return Err(NodeError::MountedElsewhere {
                device: device.to_owned(),
                at: comma_separated(&elsewhere),
                staging: staging.display().to_string(),
            });
        }
        self.prepare(&volume.id, fs.as_str()).await?;
        self.on_path(&staging, create_dir).await?;
        self.mounter
            .mount(device, &staging, fs.as_str(), &options)
            .await?;
        Ok(NodeStageVolumeResponse {})
    }

    /// Makes sure the volume's device holds its filesystem, formatting it
    /// only when [`prepare`] says so, and records a format the moment it is
    /// made (or found made before formats were recorded).
    async fn prepare(&self, id: &str, fs: &str) -> Result<(), NodeError> {
        let (volume, recorded) = self
            .volumes
            .inspect_formatted(id)
            .await?
            .ok_or_else(|| NodeError::UnknownVolume(id.to_owned()))?;
        let device = volume.device_path.as_str();
        check_readable(device).await.map_err(refused(id))?;
        let found = self.mounter.probe(device).await?;
        let preparation = prepare(device, recorded.as_deref(), &found, fs).map_err(refused(id))?;
        tracing::info!(?preparation, ?recorded, ?found, "preparing {device}");
        match preparation {
            Preparation::Mount => {}
            Preparation::RecordAndMount => self.volumes.mark_formatted(&volume, fs).await?,
            Preparation::Format => {
                self.mounter.format(device, fs).await?;
                self.volumes.mark_formatted(&volume, fs).await?;
            }
        }
        Ok(())
    }

    async fn unstage(
        &self,
        req: NodeUnstageVolumeRequest,
    ) -> Result<NodeUnstageVolumeResponse, NodeError> {
        let id = validate::volume_id(&req.volume_id)?;
        tracing::Span::current().record("volume", id.as_str());
        let staging = self.path("staging_target_path", &req.staging_target_path)?;
        let _claim = self.busy.claim(id.as_str())?;
        let mounts = self.on_path(&staging, |_| mounts()).await?;
        if let Some(mount) = mounts.iter().rev().find(|mount| mount.target == staging) {
            // A bind outliving the staging mount keeps the filesystem in use
            // unseen: the volume would look unstaged while a pod writes to it.
            let others = mounted_elsewhere(&mounts, &mount.devno, &staging);
            if !others.is_empty() {
                return Err(NodeError::StillPublished {
                    staging: staging.display().to_string(),
                    others: comma_separated(&others),
                });
            }
            self.mounter.unmount(&staging).await?;
        }
        self.usage.forget_volume(&req.volume_id);
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        req: NodePublishVolumeRequest,
    ) -> Result<NodePublishVolumeResponse, NodeError> {
        validate::volume_id(&req.volume_id)?;
        let target = self.path("target_path", &req.target_path)?;
        let pod_uid = req.volume_context.get(POD_UID_CONTEXT).cloned();
        if let Some(uid) = &pod_uid {
            check_uid(uid).map_err(NodeError::PodUid)?;
        }
        let capability = req
            .volume_capability
            .ok_or(NodeError::Missing("volume_capability"))?;
        let wanted = validate::wanted(&capability)?;
        let staging = match wanted {
            Wanted::Mount(_) => Some(self.path("staging_target_path", &req.staging_target_path)?),
            Wanted::Block => None,
        };
        let volume = self.volume(&req.volume_id).await?;
        let access = access_for(&volume, wanted)?;
        let _claim = self.busy.claim(&volume.id)?;
        let device = Path::new(&volume.device_path);
        let device_no = self.on_path(device, devno).await?;
        let source = match &staging {
            Some(staging) => {
                let mount = self
                    .on_path(staging, mounted_at)
                    .await?
                    .ok_or_else(|| NodeError::NotStaged(volume.id.clone()))?;
                if mount.devno != device_no {
                    return Err(NodeError::NotStaged(volume.id.clone()));
                }
                self.on_path(&target, create_dir).await?;
                staging.as_path()
            }
            None => {
                self.on_path(&target, create_device_file).await?;
                device
            }
        };
        let block = access == Access::Block;
        let published = self
            .on_path(&target, move |target| {
                let Some(mount) = mounted_at(target)? else {
                    return Ok(None);
                };
                // A bound device file shows devtmpfs in the mount table:
                // compare the device the target now is instead.
                let mounted_device = if block {
                    devno(target)?
                } else {
                    mount.devno.clone()
                };
                Ok(Some((mounted_device, mount.read_only())))
            })
            .await?;
        if let Some((mounted_device, read_only)) = published {
            if mounted_device != device_no || read_only != req.readonly {
                return Err(NodeError::TakenPath {
                    path: target.display().to_string(),
                });
            }
        } else {
            self.mounter.bind(source, &target, req.readonly).await?;
        }
        self.record_publication(&volume, pod_uid, &target).await;
        Ok(NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse, NodeError> {
        let id = validate::volume_id(&req.volume_id)?;
        let target = self.path("target_path", &req.target_path)?;
        let _claim = self.busy.claim(id.as_str())?;
        self.mounter.unmount(&target).await?;
        self.on_path(&target, remove_target).await?;
        let limiter = self.limiter.clone();
        let forgotten =
            tokio::task::spawn_blocking(move || limiter.unpublished(id.as_str(), &target)).await;
        if let Ok(Err(err)) = forgotten {
            tracing::warn!(error = %err, "cannot forget the publication");
        }
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, NodeError> {
        let id = validate::volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(NodeError::Missing("volume_path"));
        }
        // The index's health: the rescan refreshes it from LVM. A stats
        // call runs no LVM command, so kubelet's polling of every volume
        // costs LVM nothing.
        let volume = self
            .volumes
            .get(id.as_str())
            .await?
            .ok_or_else(|| NodeError::UnknownVolume(id.to_string()))?;
        let path = self.volume_path(&volume.id, &req.volume_path)?;
        let device = PathBuf::from(&volume.device_path);
        let size = i64::try_from(volume.size_bytes).unwrap_or(i64::MAX);
        let seen = match self
            .probe
            .run(&path, {
                let path = path.clone();
                move || look_at(&path, &device)
            })
            .await
        {
            Ok(seen) => seen?,
            // kubelet still gets an answer, and the condition says why.
            Err(hung) => {
                return Ok(NodeGetVolumeStatsResponse {
                    usage: vec![raw_usage(size)],
                    volume_condition: Some(VolumeCondition {
                        abnormal: true,
                        message: hung.to_string(),
                    }),
                });
            }
        };
        let Some(seen) = seen else {
            return Err(NodeError::NotAtPath {
                id: volume.id.clone(),
                path: req.volume_path.clone(),
            });
        };
        let (abnormal, message) = match (volume.healthy, seen.on_device, seen.unreadable) {
            (false, _, _) => (
                true,
                format!("logical volume {} is not active or unhealthy", volume.id),
            ),
            (true, _, _) if volume.kernel_errors.is_some() => (true, volume.condition().message),
            (true, _, Some(unreadable)) => (true, unreadable),
            (true, None, None) => (true, format!("{} is not mounted", path.display())),
            (true, Some(false), None) => (
                true,
                format!("{} is mounted from another device", path.display()),
            ),
            (true, Some(true), None) => (false, "healthy".to_owned()),
        };
        let usage = seen.usage.unwrap_or_else(|| vec![raw_usage(size)]);
        if let Some(bytes) = usage.first() {
            self.usage.volume_usage(&volume.id, bytes.used, bytes.total);
        }
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition { abnormal, message }),
        })
    }

    async fn expand(
        &self,
        req: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, NodeError> {
        validate::volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(NodeError::Missing("volume_path"));
        }
        let volume = self.volume(&req.volume_id).await?;
        let path = self.path("volume_path", &req.volume_path)?;
        let block = match &req.volume_capability {
            Some(capability) => {
                validate::access(std::slice::from_ref(capability), None)? == Access::Block
            }
            None => volume.access == "block",
        };
        if !block {
            let mount = self
                .on_path(&path, mounted_at)
                .await?
                .ok_or_else(|| NodeError::NotStaged(volume.id.clone()))?;
            let device_no = self.on_path(Path::new(&volume.device_path), devno).await?;
            if mount.devno != device_no {
                return Err(NodeError::NotStaged(volume.id.clone()));
            }
            self.mounter
                .grow(&volume.device_path, &path, &mount.fs_type)
                .await?;
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(volume.size_bytes).unwrap_or(i64::MAX),
        })
    }
}

/// What a stats call finds at a volume's path.
struct Seen {
    /// Whether what is mounted there is the volume's device; None: nothing is.
    on_device: Option<bool>,
    /// Bytes and inodes of the volume's filesystem mounted there.
    usage: Option<Vec<VolumeUsage>>,
    /// Why the filesystem mounted there could not be read (a filesystem
    /// shut down after an error answers EIO).
    unreadable: Option<String>,
}

/// Looks at `path` for the volume on `device`; None if there is no such path.
/// Blocking: it stats and statvfs's a pod's path.
fn look_at(path: &Path, device: &Path) -> Result<Option<Seen>, MountError> {
    let device = devno(device)?;
    let dir = match std::fs::metadata(path) {
        Ok(meta) => meta.is_dir(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // A filesystem shut down after an error fails even a stat of its root.
        Err(err) => {
            return Ok(Some(Seen {
                on_device: mounted_at(path)?.map(|mount| mount.devno == device),
                usage: None,
                unreadable: Some(format!("cannot read {}: {err}", path.display())),
            }));
        }
    };
    let on_device = match mounted_at(path)? {
        // A raw block volume is its device file, bound onto the path.
        Some(_) if !dir => Some(devno(path)? == device),
        Some(mount) => Some(mount.devno == device),
        None => None,
    };
    let (usage, unreadable) = if dir && on_device == Some(true) {
        match nix::sys::statvfs::statvfs(path) {
            Ok(fs) => (Some(usage_of(&fs)), None),
            Err(err) => (
                None,
                Some(format!(
                    "cannot read the filesystem at {}: {err}",
                    path.display()
                )),
            ),
        }
    } else {
        (None, None)
    };
    Ok(Some(Seen {
        on_device,
        usage,
        unreadable,
    }))
}

/// Bytes and inodes of a filesystem.
fn usage_of(fs: &nix::sys::statvfs::Statvfs) -> Vec<VolumeUsage> {
    let fragment = fs.fragment_size();
    let bytes = |blocks: u64| i64::try_from(blocks.saturating_mul(fragment)).unwrap_or(i64::MAX);
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    vec![
        VolumeUsage {
            available: bytes(fs.blocks_available()),
            total: bytes(fs.blocks()),
            used: bytes(fs.blocks() - fs.blocks_free()),
            unit: Unit::Bytes as i32,
        },
        VolumeUsage {
            available: count(fs.files_available()),
            total: count(fs.files()),
            used: count(fs.files() - fs.files_free()),
            unit: Unit::Inodes as i32,
        },
    ]
}

/// The size of a volume whose filesystem cannot be looked at (raw block, or
/// not mounted there).
fn raw_usage(total: i64) -> VolumeUsage {
    VolumeUsage {
        total,
        unit: Unit::Bytes as i32,
        ..VolumeUsage::default()
    }
}

/// The access a capability asks of `volume`. A mount that names no
/// filesystem means the one the volume was made with; an LV made for one
/// access cannot be used for another.
fn access_for(volume: &LocalVolume, wanted: Wanted) -> Result<Access, NodeError> {
    let wrong = |asked: &str| NodeError::WrongAccess {
        id: volume.id.clone(),
        existing: volume.access.clone(),
        asked: asked.to_owned(),
    };
    let access = match wanted {
        Wanted::Block => Access::Block,
        Wanted::Mount(Some(fs)) => Access::Filesystem(fs),
        Wanted::Mount(None) => Access::Filesystem(
            volume
                .access
                .parse::<FsType>()
                .map_err(|_| wrong("a filesystem"))?,
        ),
    };
    let asked = match access {
        Access::Block => "block".to_owned(),
        Access::Filesystem(fs) => fs.to_string(),
    };
    if volume.access == asked {
        Ok(access)
    } else {
        Err(wrong(&asked))
    }
}

/// The capability's mount flags, each of a plain shape so none can smuggle
/// a second option past `mount -o`.
fn mount_options(capability: &VolumeCapability) -> Result<Vec<String>, NodeError> {
    let Some(AccessType::Mount(mount)) = &capability.access_type else {
        return Ok(Vec::new());
    };
    for flag in &mount.mount_flags {
        let plain = !flag.is_empty()
            && flag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "=_.:/-".contains(c));
        if !plain {
            return Err(NodeError::MountOption(flag.clone()));
        }
    }
    Ok(mount.mount_flags.clone())
}

fn create_dir(path: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(path).map_err(|source| MountError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The file a raw block volume's device is bound onto, with its directory.
fn create_device_file(target: &Path) -> Result<(), MountError> {
    if let Some(parent) = target.parent() {
        create_dir(parent)?;
    }
    if !target.exists() {
        std::fs::File::create(target).map_err(|source| MountError::Io {
            path: target.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Removes the unmounted target: kubelet's directory, or its device file.
fn remove_target(target: &Path) -> Result<(), MountError> {
    let removed = match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(_) => Ok(()),
    };
    removed.map_err(|source| MountError::Io {
        path: target.display().to_string(),
        source,
    })
}

fn capability(kind: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(lvmlocal_proto::csi::v1::node_service_capability::Type::Rpc(
            Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.metrics
            .observe("NodeStageVolume", self.stage(request.into_inner()))
            .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.metrics
            .observe("NodeUnstageVolume", self.unstage(request.into_inner()))
            .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.metrics
            .observe("NodePublishVolume", self.publish(request.into_inner()))
            .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.metrics
            .observe("NodeUnpublishVolume", self.unpublish(request.into_inner()))
            .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        self.metrics
            .observe("NodeGetVolumeStats", self.stats(request.into_inner()))
            .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        self.metrics
            .observe("NodeExpandVolume", self.expand(request.into_inner()))
            .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        self.metrics
            .observe("NodeGetCapabilities", async {
                Ok::<_, Status>(NodeGetCapabilitiesResponse {
                    capabilities: vec![
                        capability(rpc::Type::StageUnstageVolume),
                        capability(rpc::Type::GetVolumeStats),
                        capability(rpc::Type::ExpandVolume),
                        capability(rpc::Type::VolumeCondition),
                        capability(rpc::Type::SingleNodeMultiWriter),
                    ],
                })
            })
            .await
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        self.metrics
            .observe("NodeGetInfo", async {
                Ok::<_, Status>(NodeGetInfoResponse {
                    node_id: self.settings.node.clone(),
                    max_volumes_per_node: self.settings.max_volumes,
                    accessible_topology: Some(Topology {
                        segments: HashMap::from([(
                            TOPOLOGY_KEY.to_owned(),
                            self.settings.node.clone(),
                        )]),
                    }),
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Runner;
    use crate::config::DiscoveryConfig;
    use crate::lvm::Lvm;

    fn service() -> NodeService {
        NodeService::new(
            NodeSettings {
                node: "node-a".into(),
                kubelet_dir: "/var/lib/kubelet".into(),
                max_volumes: 0,
            },
            Arc::new(Volumes::new(
                Lvm::new(Runner::default()),
                &DiscoveryConfig::default(),
                crate::kernel_log::KernelErrors::default(),
            )),
            Mounter::default(),
            RpcMetrics::default(),
            Arc::new(Metrics::new(&RpcMetrics::default())),
            Arc::new(IoLimiter::new(
                "/nonexistent/cgroup".into(),
                "/nonexistent/records".into(),
                Arc::new(Metrics::new(&RpcMetrics::default())),
            )),
        )
    }

    #[tokio::test]
    async fn a_pod_uid_that_is_no_uid_is_refused_first() {
        let node = service();
        let err = node
            .node_publish_volume(Request::new(NodePublishVolumeRequest {
                volume_id: "pvc-1".into(),
                target_path: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv/mount".into(),
                volume_context: HashMap::from([(POD_UID_CONTEXT.into(), "../../etc".into())]),
                ..NodePublishVolumeRequest::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(POD_UID_CONTEXT), "{}", err.message());
    }

    #[test]
    fn paths_must_stay_under_the_kubelet_directory() {
        let node = service();
        for good in [
            "/var/lib/kubelet/plugins/kubernetes.io/csi/lvmlocal.io/x/globalmount",
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/pvc-1/mount",
        ] {
            assert!(node.path("target_path", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "relative/path",
            "/etc",
            "/var/lib/kubelet",
            "/var/lib/kubeletx/pods",
            "/var/lib/kubelet/../../etc",
            "/var/lib/kubelet/pods/./x",
            "/var/lib/kubelet//pods/x",
            "/var/lib/kubelet/pods/x/",
        ] {
            let err = node.path("target_path", bad).unwrap_err();
            assert_eq!(Status::from(err).code(), Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn stats_paths_that_cannot_hold_the_volume_are_not_found() {
        let node = service();
        for (path, want) in [
            ("some/path", Code::NotFound),
            ("/etc", Code::InvalidArgument),
            ("/var/lib/kubelet/../../etc", Code::InvalidArgument),
        ] {
            let err = node.volume_path("v", path).unwrap_err();
            assert_eq!(Status::from(err).code(), want, "{path}");
        }
        // A path that does not exist holds nothing (NOT_FOUND at the call).
        let missing = Path::new("/var/lib/kubelet/pods/none/volumes/x/mount");
        assert!(look_at(missing, Path::new("/dev/null")).unwrap().is_none());
    }

    #[test]
    fn a_mount_without_a_filesystem_means_the_volumes_own() {
        let volume = |access: &str| LocalVolume {
            id: "v".into(),
            media: lvmlocal_proto::MediaClass::Nvme,
            vg: "lvmlocal-nvme".into(),
            size_bytes: 1 << 30,
            requested_bytes: 1 << 30,
            access: access.into(),
            pvc: None,
            device_path: "/dev/lvmlocal-nvme/v".into(),
            healthy: true,
            dm_name: None,
            kernel_errors: None,
            thin: None,
            origin: None,
            snapshot: false,
        };
        let xfs = volume("xfs");
        assert_eq!(
            access_for(&xfs, Wanted::Mount(None)).unwrap(),
            Access::Filesystem(FsType::Xfs)
        );
        assert_eq!(
            access_for(&xfs, Wanted::Mount(Some(FsType::Xfs))).unwrap(),
            Access::Filesystem(FsType::Xfs)
        );
        // Never formatted over, nor used as another kind of volume.
        for (access, wanted) in [
            ("xfs", Wanted::Mount(Some(FsType::Ext4))),
            ("xfs", Wanted::Block),
            ("block", Wanted::Mount(None)),
            ("block", Wanted::Mount(Some(FsType::Ext4))),
        ] {
            let err = access_for(&volume(access), wanted).unwrap_err();
            assert_eq!(
                Status::from(err).code(),
                Code::AlreadyExists,
                "{access} {wanted:?}"
            );
        }
        assert_eq!(
            access_for(&volume("block"), Wanted::Block).unwrap(),
            Access::Block
        );
    }

    #[test]
    fn a_second_call_for_a_busy_volume_is_aborted() {
        let busy = Busy::default();
        let first = busy.claim("v").unwrap();
        let err = busy.claim("v").err().expect("the volume is busy");
        assert_eq!(Status::from(err).code(), Code::Aborted);
        let _other = busy.claim("w").unwrap();
        drop(first);
        busy.claim("v").unwrap();
    }

    #[test]
    fn refusals_to_prepare_a_device_are_preconditions() {
        let damaged = MountError::NeedsRepair {
            device: "/dev/vg/v".into(),
            fs: "ext4".into(),
            repair: "e2fsck",
        };
        let status = Status::from(refused("v")(damaged));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(
            status.message().starts_with("volume v: /dev/vg/v"),
            "{status:?}"
        );
        let status = Status::from(refused("v")(MountError::Io {
            path: "/x".into(),
            source: std::io::Error::other("boom"),
        }));
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn mount_flags_cannot_smuggle_options() {
        let cap = |flags: &[&str]| VolumeCapability {
            access_type: Some(AccessType::Mount(
                lvmlocal_proto::csi::v1::volume_capability::MountVolume {
                    fs_type: "ext4".into(),
                    mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: None,
        };
        assert_eq!(
            mount_options(&cap(&["noatime", "discard"])).unwrap(),
            ["noatime", "discard"]
        );
        for bad in ["ro,suid", "x y", "", "a;b"] {
            assert!(mount_options(&cap(&[bad])).is_err(), "{bad}");
        }
    }
}
