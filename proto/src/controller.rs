//! The CSI Controller service over any [`Store`]: validate → place → store
//! → wait, with the spec's codes for every refusal.

use std::collections::HashMap;
use std::time::Duration;

use crate::crd::{ContentSource, SourceKind};
use crate::csi::v1::controller_get_volume_response;
use crate::csi::v1::controller_server::Controller;
use crate::csi::v1::controller_service_capability::{Rpc, Type as CapabilityType, rpc};
use crate::csi::v1::list_snapshots_response;
use crate::csi::v1::list_volumes_response::{self, Entry};
use crate::csi::v1::validate_volume_capabilities_response::Confirmed;
use crate::csi::v1::{
    self as csi, ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    ListSnapshotsRequest, ListSnapshotsResponse, ListVolumesRequest, ListVolumesResponse, Topology,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse,
};
use crate::io_limits::IoLimits;
use crate::params::OnNodeLoss;
use crate::thin::PROVISIONING_PARAM;
use crate::validate::Invalid;
use crate::{MediaClass, TOPOLOGY_KEY};
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Span;

use crate::error::CsiError;
use crate::params::MEDIA_PARAM;
use crate::placement::{self, NodeCapacity};
use crate::rpc::RpcMetrics;
use crate::store::{Store, StoreError};
use crate::validate::{self, CreateRequest, Wanted};
use crate::volume::{Access, NewVolume, Volume, VolumeId, VolumeState};

/// Behaviour an operator may tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerSettings {
    /// Size of a volume whose CreateVolume sets no capacity (the spec leaves
    /// it to the plugin; Kubernetes always sets one).
    pub default_size_bytes: u64,
    /// How long CreateVolume and ControllerExpandVolume wait for the node
    /// before answering DEADLINE_EXCEEDED. Keep it below the sidecars'
    /// `--timeout`, so the answer reaches them.
    pub wait: Duration,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            default_size_bytes: 1 << 30,
            wait: Duration::from_secs(10),
        }
    }
}

/// The capabilities a CO may rely on; nothing else is implemented.
const CAPABILITIES: [rpc::Type; 11] = [
    rpc::Type::CreateDeleteVolume,
    rpc::Type::ExpandVolume,
    rpc::Type::GetCapacity,
    rpc::Type::ListVolumes,
    rpc::Type::SingleNodeMultiWriter,
    rpc::Type::GetVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::ModifyVolume,
    rpc::Type::CreateDeleteSnapshot,
    rpc::Type::ListSnapshots,
    rpc::Type::CloneVolume,
];

/// How often a deletion is checked on.
const GONE_POLL: Duration = Duration::from_millis(100);

/// The capabilities that need snapshots kept.
const SNAPSHOT_CAPABILITIES: [rpc::Type; 3] = [
    rpc::Type::CreateDeleteSnapshot,
    rpc::Type::ListSnapshots,
    rpc::Type::CloneVolume,
];

pub struct ControllerService<S> {
    store: S,
    settings: ControllerSettings,
    metrics: RpcMetrics,
}

impl<S: Store> ControllerService<S> {
    pub fn new(store: S, settings: ControllerSettings, metrics: RpcMetrics) -> Self {
        Self {
            store,
            settings,
            metrics,
        }
    }

    /// The store the service works on.
    pub fn store(&self) -> &S {
        &self.store
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<CreateVolumeResponse, CsiError> {
        let req = validate::create(&req)?;
        Span::current().record("volume", req.id.as_str());
        let deadline = Instant::now() + self.settings.wait;
        let volume = match self.store.get(&req.id).await? {
            Some(existing) if existing.state == VolumeState::Deleting => {
                // A missing source is the answer, whatever else holds.
                if let Some(source) = &req.source {
                    self.place_from(&req, source).await?;
                }
                return Err(CsiError::BeingDeleted(existing.id));
            }
            Some(existing) => existing,
            None => {
                let new = match &req.source {
                    None => self.place(&req).await?,
                    Some(source) => self.place_from(&req, source).await?,
                };
                tracing::info!(node = %new.node, bytes = new.size_bytes, "creating");
                self.store.create(new).await?
            }
        };
        if volume.state == VolumeState::Deleting {
            return Err(CsiError::BeingDeleted(volume.id));
        }
        check_same(&volume, &req)?;
        let volume = self.settle(volume, deadline).await?;
        if let VolumeState::Failed {
            lv_exists: false, ..
        } = volume.state
        {
            // Forget the attempt so that a retry, likely on another node
            // once the pod is rescheduled, starts over.
            self.store.delete(&volume.id).await?;
        }
        let capacity_bytes = ready_size(&volume)?;
        Ok(CreateVolumeResponse {
            volume: Some(csi_volume(&volume, capacity_bytes)),
        })
    }

    /// Chooses the node and the size of a new volume.
    async fn place(&self, req: &CreateRequest) -> Result<NewVolume, CsiError> {
        let candidates = self.store.capacities(req.media).await?;
        let group = placement::choose(&req.nodes, req.media, &candidates)?;
        let size_bytes = placement::size_for(req.size, self.settings.default_size_bytes, group)?;
        let charged = req
            .thin
            .map_or(size_bytes, |ratio| ratio.charge(size_bytes));
        placement::check_fits(group, req.media, charged, req.thin.is_some())?;
        Ok(NewVolume {
            id: req.id.clone(),
            node: group.node.clone(),
            media: req.media,
            access: req.access,
            size_bytes,
            pvc: req.pvc.clone(),
            on_node_loss: req.on_node_loss,
            io_limits: req.io_limits,
            thin: req.thin,
            snapshot_of: None,
            source: None,
        })
    }

    /// A restore or a clone: a thin snapshot of the source, on its node.
    async fn place_from(
        &self,
        req: &CreateRequest,
        source: &ContentSource,
    ) -> Result<NewVolume, CsiError> {
        if !self.store.keeps_snapshots() {
            return unsupported("restoring and cloning volumes without a cluster");
        }
        let what = match source.kind {
            SourceKind::Snapshot => "snapshot",
            SourceKind::Volume => "volume",
        };
        let id = VolumeId::parse(&source.name).map_err(Invalid::from)?;
        let origin = match self.store.get(&id).await? {
            Some(origin)
                if origin.state != VolumeState::Deleting
                    && origin.snapshot_of.is_some() == (source.kind == SourceKind::Snapshot) =>
            {
                origin
            }
            _ if source.kind == SourceKind::Snapshot => return Err(CsiError::SnapshotNotFound(id)),
            _ => return Err(CsiError::NotFound(id)),
        };
        if origin.thin.is_none() {
            return Err(CsiError::Thick(format!(
                "{what} {id} is a thick volume: only thin volumes have snapshots and clones"
            )));
        }
        let Some(ratio) = req.thin else {
            return Err(CsiError::Thick(format!(
                "a volume made from {what} {id} is a thin snapshot of it: its class must set \
                 {PROVISIONING_PARAM}: thin"
            )));
        };
        if origin.media != req.media {
            return Err(CsiError::Thick(format!(
                "{what} {id} is on {} and cannot be copied to {}",
                origin.media, req.media
            )));
        }
        let VolumeState::Ready {
            size_bytes: origin_bytes,
        } = origin.state
        else {
            return Err(CsiError::SourceNotReady { what, id });
        };
        if !placement::accessible(&req.nodes, &origin.node) {
            return Err(CsiError::SourceElsewhere {
                what,
                id,
                node: origin.node,
                why: "a copy lives on its source's node",
            });
        }
        let group = self.group_of(&origin).await?.ok_or_else(|| {
            placement::PlacementError::NoVolumeGroup {
                node: origin.node.clone(),
                media: origin.media,
            }
        })?;
        let size_bytes = placement::size_for(req.size, origin_bytes, &group)?;
        if size_bytes < origin_bytes {
            return Err(CsiError::SmallerThanSource {
                wanted: size_bytes,
                source_bytes: origin_bytes,
            });
        }
        placement::check_fits(&group, req.media, ratio.charge(size_bytes), true)?;
        Ok(NewVolume {
            id: req.id.clone(),
            node: origin.node,
            media: req.media,
            access: req.access,
            size_bytes,
            pvc: req.pvc.clone(),
            on_node_loss: req.on_node_loss,
            io_limits: req.io_limits,
            thin: Some(ratio),
            snapshot_of: None,
            source: Some(source.clone()),
        })
    }

    /// A thin snapshot of a thin volume, on its node; idempotent by name.
    async fn snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, CsiError> {
        let req = validate::create_snapshot(&req)?;
        Span::current().record("volume", req.id.as_str());
        let deadline = Instant::now() + self.settings.wait;
        let snapshot = match self.store.get(&req.id).await? {
            Some(existing) => {
                if existing.snapshot_of.as_ref() != Some(&req.source) {
                    return Err(CsiError::AlreadyExists {
                        id: req.id,
                        existing: match &existing.snapshot_of {
                            Some(source) => format!("a snapshot of volume {source}"),
                            None => "a volume".to_owned(),
                        },
                        wanted: format!("a snapshot of volume {}", req.source),
                    });
                }
                existing
            }
            None => {
                let origin = self.live(&req.source).await?;
                if origin.thin.is_none() {
                    return Err(CsiError::Thick(format!(
                        "volume {} is a thick volume: only thin volumes (a class with \
                         {PROVISIONING_PARAM}: thin) have snapshots",
                        origin.id
                    )));
                }
                let size_bytes = match origin.state {
                    VolumeState::Ready { size_bytes } => size_bytes,
                    _ => origin.size_bytes,
                };
                tracing::info!(source = %origin.id, node = %origin.node, "snapshotting");
                self.store
                    .create(NewVolume {
                        id: req.id.clone(),
                        node: origin.node.clone(),
                        media: origin.media,
                        access: origin.access,
                        size_bytes,
                        pvc: None,
                        on_node_loss: OnNodeLoss::Keep,
                        io_limits: IoLimits::NONE,
                        thin: origin.thin,
                        snapshot_of: Some((origin.id.clone(), req.volume_snapshot.clone())),
                        source: None,
                    })
                    .await?
            }
        };
        if snapshot.state == VolumeState::Deleting {
            return Err(CsiError::BeingDeleted(snapshot.id));
        }
        let snapshot = self.settle(snapshot, deadline).await?;
        ready_size(&snapshot)?;
        Ok(CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&snapshot)),
        })
    }

    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, CsiError> {
        let id = validate::delete_snapshot(&req)?;
        Span::current().record("volume", id.as_str());
        self.remove(&id, true).await?;
        Ok(DeleteSnapshotResponse {})
    }

    async fn list_snapshots(
        &self,
        req: ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse, CsiError> {
        let req = validate::list_snapshots(&req)?;
        let wanted = |snapshot: &Volume| {
            req.id.as_ref().is_none_or(|id| snapshot.id.as_str() == id)
                && req.source.as_ref().is_none_or(|source| {
                    snapshot
                        .snapshot_of
                        .as_ref()
                        .is_some_and(|of| of.as_str() == source)
                })
        };
        let limit = req.max_entries.unwrap_or(usize::MAX);
        let mut found = Vec::new();
        let mut after = req.after.clone();
        // Filtered pages can come back short: read on until the page is full.
        loop {
            let page = self.store.list(after.as_ref(), 100, true).await?;
            let done = page.len() < 100;
            after = page.last().map(|snapshot| snapshot.id.clone());
            found.extend(page.into_iter().filter(|snapshot| wanted(snapshot)));
            if done || found.len() > limit {
                break;
            }
        }
        let next_token = if found.len() > limit {
            found.truncate(limit);
            found
                .last()
                .map(|s| validate::next_token(&s.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(ListSnapshotsResponse {
            entries: found
                .iter()
                .map(|snapshot| list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(snapshot)),
                })
                .collect(),
            next_token,
        })
    }

    async fn settle(&self, volume: Volume, deadline: Instant) -> Result<Volume, CsiError> {
        if volume.settled() {
            return Ok(volume);
        }
        Ok(self.store.wait(&volume, deadline).await?)
    }

    async fn delete(&self, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse, CsiError> {
        let id = validate::delete(&req)?;
        Span::current().record("volume", id.as_str());
        self.remove(&id, false).await?;
        Ok(DeleteVolumeResponse {})
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        let req = validate::expand(&req)?;
        Span::current().record("volume", req.id.as_str());
        let deadline = Instant::now() + self.settings.wait;
        let volume = self.live(&req.id).await?;
        let group = self.group_of(&volume).await?;
        let current = volume.size_bytes;
        // Kubernetes' recovery from a failed expansion: while the LV is
        // smaller than asked, a request for less (down to the LV's size)
        // replaces the one not carried out. The LV itself never shrinks.
        let base = match volume.actual_bytes {
            Some(actual) if actual < current && req.size.required < current => actual,
            _ => current,
        };
        let target = match &group {
            Some(group) => placement::expanded_size(base, req.size, group)?,
            None if req.size.contains(base) => base,
            None => {
                return Err(placement::PlacementError::NoVolumeGroup {
                    node: volume.node,
                    media: volume.media,
                }
                .into());
            }
        };
        let volume = match group {
            Some(group) if target > current => {
                let growth = match volume.thin {
                    Some(ratio) => ratio.charge(target) - ratio.charge(current),
                    None => target - current,
                };
                placement::check_fits(&group, volume.media, growth, volume.thin.is_some())
                    .map_err(|err| match err {
                        placement::PlacementError::Insufficient {
                            node,
                            media,
                            free,
                            needed,
                        } => placement::PlacementError::CannotGrow {
                            node,
                            media,
                            free,
                            needed,
                        },
                        other => other,
                    })?;
                tracing::info!(from = current, to = target, "expanding");
                self.store.resize(&volume, target).await?
            }
            _ if target < current => {
                tracing::info!(
                    from = current,
                    to = target,
                    "expansion not done lowered as asked"
                );
                self.store.resize(&volume, target).await?
            }
            _ => volume,
        };
        let volume = self.settle(volume, deadline).await?;
        let capacity_bytes = ready_size(&volume).map_err(|err| match err {
            CsiError::NodeFailed { id, node, message } => {
                CsiError::GrowFailed { id, node, message }
            }
            other => other,
        })?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes,
            node_expansion_required: matches!(volume.access, Access::Filesystem(_)),
        })
    }

    /// Records the volume's new IO limits; the node applies them to the
    /// volume's pods and says so in the volume's status.
    async fn modify(
        &self,
        req: ControllerModifyVolumeRequest,
    ) -> Result<ControllerModifyVolumeResponse, CsiError> {
        if !self.store.keeps_io_limits() {
            return unsupported("ControllerModifyVolume");
        }
        let req = validate::modify(&req)?;
        Span::current().record("volume", req.id.as_str());
        let volume = self.live(&req.id).await?;
        if volume.io_limits != req.io_limits {
            tracing::info!(from = %volume.io_limits, to = %req.io_limits, "changing IO limits");
            self.store.modify(&volume, req.io_limits).await?;
        }
        Ok(ControllerModifyVolumeResponse {})
    }

    async fn validate_capabilities(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, CsiError> {
        let id = validate::capability_check(&req)?;
        Span::current().record("volume", id.as_str());
        let volume = self.live(&id).await?;
        Ok(match supports(&volume, &req) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(why) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        })
    }

    async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse, CsiError> {
        let req = validate::list(&req)?;
        let limit = req.max_entries.unwrap_or(usize::MAX);
        let mut volumes = self
            .store
            .list(req.after.as_ref(), limit.saturating_add(1), false)
            .await?;
        let next_token = if volumes.len() > limit {
            volumes.truncate(limit);
            volumes
                .last()
                .map(|v| validate::next_token(&v.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let entries = volumes
            .iter()
            .map(|volume| Entry {
                volume: Some(csi_volume(volume, reported_size(volume))),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(condition(volume)),
                }),
            })
            .collect();
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn capacity(&self, req: GetCapacityRequest) -> Result<GetCapacityResponse, CsiError> {
        let query = validate::capacity(&req)?;
        let classes = match query.media {
            Some(media) => vec![media],
            None => MediaClass::ALL.to_vec(),
        };
        let mut largest = 0;
        for media in classes {
            let groups = self.store.capacities(media).await?;
            let free = groups
                .iter()
                .filter(|group| query.node.as_ref().is_none_or(|node| &group.node == node))
                .map(|group| group.free_for(query.thin.is_some()))
                .max()
                .unwrap_or(0);
            largest = largest.max(free);
        }
        // A linear LV can take all of a group's free space, so the largest
        // volume is the available capacity itself; thin volumes get the
        // ratio's multiple of it.
        let largest = query.thin.map_or(largest, |ratio| ratio.capacity(largest));
        let available = i64::try_from(largest).unwrap_or(i64::MAX);
        Ok(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(available),
            minimum_volume_size: None,
        })
    }

    async fn get_volume(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse, CsiError> {
        let id = validate::volume_id(&req.volume_id)?;
        Span::current().record("volume", id.as_str());
        let volume = self.live(&id).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&volume, reported_size(&volume))),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: Some(condition(&volume)),
            }),
        })
    }

    /// Deletes the snapshot (`snapshot`) or the volume `id` names, and waits
    /// a while for it to be gone. An id of the other kind is not this call's
    /// to delete, and an unknown one is already gone: both are left alone.
    async fn remove(&self, id: &VolumeId, snapshot: bool) -> Result<(), CsiError> {
        if let Some(found) = self.store.get(id).await?
            && found.snapshot_of.is_some() == snapshot
        {
            self.store.delete(id).await?;
            self.gone(id).await?;
        }
        Ok(())
    }

    /// Waits a while for a deleted volume or snapshot to be gone, so its
    /// name can be used again at once; past the wait it goes on its own.
    async fn gone(&self, id: &VolumeId) -> Result<(), CsiError> {
        let deadline = Instant::now() + self.settings.wait;
        while self.store.get(id).await?.is_some() && Instant::now() < deadline {
            tokio::time::sleep(GONE_POLL).await;
        }
        Ok(())
    }

    /// The volume, unless it is unknown, a snapshot, or on its way out.
    async fn live(&self, id: &VolumeId) -> Result<Volume, CsiError> {
        match self.store.get(id).await? {
            Some(volume)
                if volume.state != VolumeState::Deleting && volume.snapshot_of.is_none() =>
            {
                Ok(volume)
            }
            _ => Err(CsiError::NotFound(id.clone())),
        }
    }

    async fn group_of(&self, volume: &Volume) -> Result<Option<NodeCapacity>, CsiError> {
        let groups = self.store.capacities(volume.media).await?;
        Ok(groups.into_iter().find(|group| group.node == volume.node))
    }
}

/// ALREADY_EXISTS unless the existing volume is what `req` asks for.
fn check_same(volume: &Volume, req: &CreateRequest) -> Result<(), CsiError> {
    let differs = |existing: String, wanted: String| CsiError::AlreadyExists {
        id: volume.id.clone(),
        existing,
        wanted,
    };
    if volume.media != req.media {
        return Err(differs(
            format!("media {}", volume.media),
            format!("media {}", req.media),
        ));
    }
    if volume.access != req.access {
        return Err(differs(volume.access.to_string(), req.access.to_string()));
    }
    let provisioning = |thin: bool| if thin { "thin" } else { "thick" }.to_owned();
    if volume.thin.is_some() != req.thin.is_some() {
        return Err(differs(
            provisioning(volume.thin.is_some()),
            provisioning(req.thin.is_some()),
        ));
    }
    if !req.size.contains(volume.size_bytes) {
        return Err(differs(
            format!("{} bytes", volume.size_bytes),
            req.size.to_string(),
        ));
    }
    if volume.source != req.source || volume.snapshot_of.is_some() {
        return Err(differs(
            describe_source(volume.source.as_ref(), volume.snapshot_of.is_some()),
            describe_source(req.source.as_ref(), false),
        ));
    }
    if !placement::accessible(&req.nodes, &volume.node) {
        return Err(differs(
            format!("node {}", volume.node),
            format!("nodes {:?}", req.nodes),
        ));
    }
    Ok(())
}

fn describe_source(source: Option<&ContentSource>, snapshot: bool) -> String {
    match source {
        _ if snapshot => "a snapshot".to_owned(),
        None => "no content source".to_owned(),
        Some(ContentSource {
            kind: SourceKind::Snapshot,
            name,
        }) => format!("the content of snapshot {name}"),
        Some(ContentSource {
            kind: SourceKind::Volume,
            name,
        }) => format!("the content of volume {name}"),
    }
}

fn csi_snapshot(snapshot: &Volume) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: reported_size(snapshot),
        snapshot_id: snapshot.id.to_string(),
        source_volume_id: snapshot
            .snapshot_of
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        creation_time: Some(prost_types::Timestamp {
            seconds: snapshot.created_seconds.unwrap_or(0),
            nanos: 0,
        }),
        ready_to_use: matches!(snapshot.state, VolumeState::Ready { .. }),
        group_snapshot_id: String::new(),
    }
}

/// The size of a volume the node has made, or the error why it has not.
fn ready_size(volume: &Volume) -> Result<i64, CsiError> {
    match &volume.state {
        VolumeState::Ready { size_bytes } => Ok(i64::try_from(*size_bytes).unwrap_or(i64::MAX)),
        VolumeState::Failed { message, .. } => Err(CsiError::NodeFailed {
            id: volume.id.clone(),
            node: volume.node.clone(),
            message: message.clone(),
        }),
        VolumeState::Deleting => Err(CsiError::BeingDeleted(volume.id.clone())),
        VolumeState::Pending => Err(StoreError::Corrupt(format!(
            "the store answered for volume {} before its node did",
            volume.id
        ))
        .into()),
    }
}

/// The size ListVolumes shows: the LV's once made, the asked one before.
fn reported_size(volume: &Volume) -> i64 {
    let bytes = match volume.state {
        VolumeState::Ready { size_bytes } => size_bytes,
        _ => volume.size_bytes,
    };
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn csi_volume(volume: &Volume, capacity_bytes: i64) -> csi::Volume {
    csi::Volume {
        capacity_bytes,
        volume_id: volume.id.to_string(),
        volume_context: HashMap::from([(MEDIA_PARAM.to_owned(), volume.media.to_string())]),
        content_source: volume.source.as_ref().map(|source| {
            use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            csi::VolumeContentSource {
                r#type: Some(match source.kind {
                    SourceKind::Snapshot => Type::Snapshot(SnapshotSource {
                        snapshot_id: source.name.clone(),
                    }),
                    SourceKind::Volume => Type::Volume(VolumeSource {
                        volume_id: source.name.clone(),
                    }),
                }),
            }
        }),
        accessible_topology: vec![Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), volume.node.clone())]),
        }],
    }
}

/// The volume's health as the CO is told it: the node's word, or until the
/// node has one, what the volume's state says.
fn condition(volume: &Volume) -> csi::VolumeCondition {
    if let Some(condition) = &volume.condition {
        return csi::VolumeCondition {
            abnormal: condition.abnormal,
            message: condition.message.clone(),
        };
    }
    match &volume.state {
        VolumeState::Failed { message, .. } => csi::VolumeCondition {
            abnormal: true,
            message: message.clone(),
        },
        VolumeState::Pending => csi::VolumeCondition {
            abnormal: false,
            message: "not yet made on its node".to_owned(),
        },
        VolumeState::Ready { .. } | VolumeState::Deleting => csi::VolumeCondition {
            abnormal: false,
            message: "healthy".to_owned(),
        },
    }
}

/// Whether `volume` serves every capability of `req`; the reason if not.
fn supports(volume: &Volume, req: &ValidateVolumeCapabilitiesRequest) -> Result<(), String> {
    let params = validate::parameters(&req.parameters).map_err(|e| e.to_string())?;
    if let Some(media) = params.media.filter(|media| *media != volume.media) {
        return Err(format!("volume is on {}, not {media}", volume.media));
    }
    for capability in &req.volume_capabilities {
        let wanted = validate::wanted(capability).map_err(|e| e.to_string())?;
        let fits = match (wanted, volume.access) {
            (Wanted::Block, Access::Block) => true,
            (Wanted::Mount(None), Access::Filesystem(_)) => true,
            (Wanted::Mount(Some(fs)), Access::Filesystem(have)) => fs == have,
            _ => false,
        };
        if !fits {
            return Err(format!("volume is a {} volume", volume.access));
        }
    }
    Ok(())
}

fn unsupported<T>(what: &'static str) -> Result<T, CsiError> {
    Err(CsiError::Unsupported(what))
}

#[tonic::async_trait]
impl<S: Store> Controller for ControllerService<S> {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        self.metrics
            .observe("CreateVolume", self.create(request.into_inner()))
            .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.metrics
            .observe("DeleteVolume", self.delete(request.into_inner()))
            .await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerPublishVolume", async {
                unsupported("ControllerPublishVolume")
            })
            .await
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerUnpublishVolume", async {
                unsupported("ControllerUnpublishVolume")
            })
            .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        self.metrics
            .observe(
                "ValidateVolumeCapabilities",
                self.validate_capabilities(request.into_inner()),
            )
            .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        self.metrics
            .observe("ListVolumes", self.list(request.into_inner()))
            .await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        self.metrics
            .observe("GetCapacity", self.capacity(request.into_inner()))
            .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        self.metrics
            .observe("ControllerGetCapabilities", async {
                Ok::<_, CsiError>(ControllerGetCapabilitiesResponse {
                    capabilities: CAPABILITIES
                        .iter()
                        .filter(|rpc| {
                            **rpc != rpc::Type::ModifyVolume || self.store.keeps_io_limits()
                        })
                        .filter(|rpc| {
                            !SNAPSHOT_CAPABILITIES.contains(rpc) || self.store.keeps_snapshots()
                        })
                        .map(|rpc| ControllerServiceCapability {
                            r#type: Some(CapabilityType::Rpc(Rpc {
                                r#type: *rpc as i32,
                            })),
                        })
                        .collect(),
                })
            })
            .await
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        self.metrics
            .observe("CreateSnapshot", async {
                if !self.store.keeps_snapshots() {
                    return unsupported("CreateSnapshot without a cluster");
                }
                self.snapshot(request.into_inner()).await
            })
            .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        self.metrics
            .observe("DeleteSnapshot", async {
                if !self.store.keeps_snapshots() {
                    return unsupported("DeleteSnapshot without a cluster");
                }
                self.delete_snapshot(request.into_inner()).await
            })
            .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        self.metrics
            .observe("ListSnapshots", async {
                if !self.store.keeps_snapshots() {
                    return unsupported("ListSnapshots without a cluster");
                }
                self.list_snapshots(request.into_inner()).await
            })
            .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerExpandVolume", self.expand(request.into_inner()))
            .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerGetVolume", self.get_volume(request.into_inner()))
            .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        self.metrics
            .observe("ControllerModifyVolume", self.modify(request.into_inner()))
            .await
    }
}
