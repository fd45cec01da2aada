//! Turns each CSI Controller request into a typed, checked request. Pure:
//! no store and no I/O, so the cluster controller and the agent's standalone
//! mode refuse the same inputs with the same codes.

use std::collections::HashMap;
use std::fmt;

use crate::crd::{ContentSource, PvcRef, SourceKind};
use crate::csi::v1::volume_capability::access_mode::Mode;
use crate::csi::v1::volume_capability::{AccessMode, AccessType};
use crate::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerModifyVolumeRequest,
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    GetCapacityRequest, ListSnapshotsRequest, ListVolumesRequest, Topology,
    ValidateVolumeCapabilitiesRequest, VolumeCapability, volume_content_source,
};
use crate::io_limits::{self, InvalidIoLimit, IoLimits};
use crate::params::{
    FS_TYPE_PARAM, MEDIA_PARAM, ON_NODE_LOSS, OnNodeLoss, PLACEMENT_PARAM, PV_NAME_PARAM,
    PVC_NAME_PARAM, PVC_NAMESPACE_PARAM, ParseOnNodeLossError, Placement,
};
use crate::thin::{
    OVERPROVISION_PARAM, PROVISIONING_PARAM, ParseProvisioningError, ParseRatioError, Provisioning,
    Ratio,
};
use crate::{MediaClass, ParseMediaClassError, TOPOLOGY_KEY};
use tonic::Code;

use crate::volume::{Access, FsType, InvalidVolumeId, UnsupportedFsType, VolumeId};

/// The sidecars' own parameter namespace: keys under it that lvmlocal does
/// not use are the sidecars' business and pass unchecked.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// ListVolumes tokens are `after:<last id of the previous page>`, so a page
/// boundary survives volumes coming and going, and anything else is refused.
const TOKEN_PREFIX: &str = "after:";

/// A request the driver refuses before touching any store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("volume name is missing")]
    MissingName,
    #[error("volume id is missing")]
    MissingId,
    #[error(transparent)]
    Id(#[from] InvalidVolumeId),
    #[error("volume capabilities are missing")]
    MissingCapabilities,
    #[error("a volume capability has no access mode")]
    MissingAccessMode,
    #[error("access mode {0} is not supported: an lvmlocal volume lives on one node")]
    AccessMode(&'static str),
    #[error("access mode {0} is not a known mode")]
    UnknownAccessMode(i32),
    #[error("a volume capability has neither mount nor block access type")]
    MissingAccessType,
    #[error("a volume cannot be asked for as both block and filesystem")]
    MixedAccessTypes,
    #[error(transparent)]
    FsType(#[from] UnsupportedFsType),
    #[error("filesystem types {0} and {1} are both asked for")]
    ConflictingFsTypes(FsType, FsType),
    #[error("parameter {MEDIA_PARAM} is required: nvme, ssd or hdd")]
    MissingMedia,
    #[error("parameter {MEDIA_PARAM}: {0}")]
    Media(#[from] ParseMediaClassError),
    #[error("parameter {PLACEMENT_PARAM} must be binpack, spread or balanced, not {0:?}")]
    Placement(String),
    #[error("parameter {0}")]
    OnNodeLoss(#[from] ParseOnNodeLossError),
    #[error(transparent)]
    IoLimit(#[from] InvalidIoLimit),
    #[error(transparent)]
    Provisioning(#[from] ParseProvisioningError),
    #[error(transparent)]
    Ratio(#[from] ParseRatioError),
    #[error("{OVERPROVISION_PARAM} applies to thin volumes only: set {PROVISIONING_PARAM}: thin")]
    RatioWithoutThin,
    #[error(
        "unknown parameter {0:?}; lvmlocal reads {MEDIA_PARAM}, {FS_TYPE_PARAM}, {PLACEMENT_PARAM}, {ON_NODE_LOSS}, {PROVISIONING_PARAM}, {OVERPROVISION_PARAM} and the IO limits {keys}",
        keys = io_limits::KEYS.join(", ")
    )]
    UnknownParameter(String),
    #[error(
        "mutable parameter {0:?} cannot be set: a VolumeAttributesClass of lvmlocal sets only the IO limits {keys}",
        keys = io_limits::KEYS.join(", ")
    )]
    UnknownMutableParameter(String),
    #[error("parameters {PVC_NAME_PARAM} and {PVC_NAMESPACE_PARAM} come together")]
    PartialPvc,
    #[error("capacity range has a negative value")]
    NegativeCapacity,
    #[error("capacity range {0} has its limit below the required size")]
    LimitBelowRequired(SizeRange),
    #[error("capacity range is required")]
    MissingCapacity,
    #[error("the volume content source names neither a snapshot nor a volume")]
    ContentSource,
    #[error("snapshot name is missing")]
    MissingSnapshotName,
    #[error("snapshot id is missing")]
    MissingSnapshotId,
    #[error("the source volume id of the snapshot is missing")]
    MissingSourceVolume,
    #[error("unknown snapshot parameter {0:?}; lvmlocal reads none")]
    UnknownSnapshotParameter(String),
    #[error("topology segment {0:?} does not name a node with {TOPOLOGY_KEY}")]
    Segment(HashMap<String, String>),
    #[error("max_entries must not be negative")]
    NegativeMaxEntries,
    #[error("starting token {0:?} was not issued by this driver; list again from the start")]
    StartingToken(String),
}

impl Invalid {
    /// The gRPC code the CSI spec names for this refusal.
    pub fn code(&self) -> Code {
        match self {
            Invalid::LimitBelowRequired(_) => Code::OutOfRange,
            Invalid::StartingToken(_) => Code::Aborted,
            _ => Code::InvalidArgument,
        }
    }
}

/// Bytes asked for: at least `required` (0: no minimum), at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    pub required: u64,
    pub limit: Option<u64>,
}

impl SizeRange {
    pub fn contains(&self, bytes: u64) -> bool {
        bytes >= self.required && self.limit.is_none_or(|limit| bytes <= limit)
    }
}

impl fmt::Display for SizeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.limit {
            Some(limit) => write!(f, "[{}, {limit}] bytes", self.required),
            None => write!(f, "[{}, unlimited] bytes", self.required),
        }
    }
}

/// The nodes a request may be placed on, from its topology requirement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeChoice {
    pub preferred: Vec<String>,
    pub requisite: Vec<String>,
}

/// A checked CreateVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    pub name: String,
    pub id: VolumeId,
    pub media: MediaClass,
    pub access: Access,
    pub size: SizeRange,
    pub nodes: NodeChoice,
    pub pvc: Option<PvcRef>,
    pub on_node_loss: OnNodeLoss,
    /// The class's limits, overlaid with those of the claim's
    /// VolumeAttributesClass.
    pub io_limits: IoLimits,
    /// A thin volume's overprovisioning ratio; None for a thick volume.
    pub thin: Option<Ratio>,
    /// The snapshot to restore, or the volume to clone.
    pub source: Option<ContentSource>,
}

/// A checked CreateSnapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub id: VolumeId,
    pub source: VolumeId,
    /// The VolumeSnapshot it is for, from the snapshotter's
    /// `--extra-create-metadata`.
    pub volume_snapshot: Option<PvcRef>,
}

/// A checked ListSnapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotListRequest {
    pub max_entries: Option<usize>,
    pub after: Option<VolumeId>,
    /// Only this snapshot; an id no snapshot can have matches nothing.
    pub id: Option<String>,
    /// Only the snapshots of this volume.
    pub source: Option<String>,
}

/// A checked ControllerModifyVolume: the volume's limits become exactly
/// `io_limits`, since a VolumeAttributesClass says all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModifyRequest {
    pub id: VolumeId,
    pub io_limits: IoLimits,
}

/// A checked ControllerExpandVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandRequest {
    pub id: VolumeId,
    pub size: SizeRange,
}

/// A checked ListVolumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// `None`: no limit.
    pub max_entries: Option<usize>,
    /// Start after this id.
    pub after: Option<VolumeId>,
}

/// A checked GetCapacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityQuery {
    /// `None`: any class.
    pub media: Option<MediaClass>,
    /// `None`: any node.
    pub node: Option<String>,
    /// Asked for thin volumes of this ratio.
    pub thin: Option<Ratio>,
}

/// What one volume capability asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Block,
    /// A filesystem, of this type if named.
    Mount(Option<FsType>),
}

/// The StorageClass parameters lvmlocal reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parameters {
    pub media: Option<MediaClass>,
    pub fs_type: Option<FsType>,
    pub pvc: Option<PvcRef>,
    pub placement: Option<Placement>,
    pub on_node_loss: OnNodeLoss,
    pub io_limits: IoLimits,
    pub provisioning: Provisioning,
    pub ratio: Option<Ratio>,
}

impl Parameters {
    /// The overprovisioning ratio of a thin class (1 unless it names one);
    /// None for a thick class.
    pub fn thin(&self) -> Option<Ratio> {
        (self.provisioning == Provisioning::Thin).then(|| self.ratio.unwrap_or(Ratio::ONE))
    }
}

/// Checks a volume id from a CO request; shared with the Node service.
pub fn volume_id(id: &str) -> Result<VolumeId, Invalid> {
    if id.is_empty() {
        return Err(Invalid::MissingId);
    }
    Ok(VolumeId::parse(id)?)
}

/// Checks fields in the order the CSI spec lists them.
pub fn create(req: &CreateVolumeRequest) -> Result<CreateRequest, Invalid> {
    if req.name.is_empty() {
        return Err(Invalid::MissingName);
    }
    let size = size_range(req.capacity_range.as_ref())?;
    let params = parameters(&req.parameters)?;
    let access = access(&req.volume_capabilities, params.fs_type)?;
    let media = params.media.ok_or(Invalid::MissingMedia)?;
    let source = match &req.volume_content_source {
        None => None,
        Some(source) => Some(content_source(source)?),
    };
    let nodes = match &req.accessibility_requirements {
        Some(topology) => NodeChoice {
            preferred: topology_nodes(&topology.preferred)?,
            requisite: topology_nodes(&topology.requisite)?,
        },
        None => NodeChoice::default(),
    };
    let io_limits = params
        .io_limits
        .overlaid(mutable_parameters(&req.mutable_parameters)?);
    let thin = params.thin();
    Ok(CreateRequest {
        name: req.name.clone(),
        id: VolumeId::from_name(&req.name),
        media,
        access,
        size,
        nodes,
        pvc: params.pvc,
        on_node_loss: params.on_node_loss,
        io_limits,
        thin,
        source,
    })
}

/// The snapshot or volume a CreateVolume names as its content.
fn content_source(source: &crate::csi::v1::VolumeContentSource) -> Result<ContentSource, Invalid> {
    use volume_content_source::Type;
    let (kind, id) = match &source.r#type {
        Some(Type::Snapshot(snapshot)) => (SourceKind::Snapshot, &snapshot.snapshot_id),
        Some(Type::Volume(volume)) => (SourceKind::Volume, &volume.volume_id),
        None => return Err(Invalid::ContentSource),
    };
    Ok(ContentSource {
        kind,
        name: volume_id(id)?.to_string(),
    })
}

/// The snapshotter's own parameters (`--extra-create-metadata`).
const SNAPSHOT_NAME_PARAM: &str = "csi.storage.k8s.io/volumesnapshot/name";
const SNAPSHOT_NAMESPACE_PARAM: &str = "csi.storage.k8s.io/volumesnapshot/namespace";

pub fn create_snapshot(req: &CreateSnapshotRequest) -> Result<SnapshotRequest, Invalid> {
    if req.name.is_empty() {
        return Err(Invalid::MissingSnapshotName);
    }
    if req.source_volume_id.is_empty() {
        return Err(Invalid::MissingSourceVolume);
    }
    let source = volume_id(&req.source_volume_id)?;
    let (mut name, mut namespace) = (None, None);
    for (key, value) in &req.parameters {
        match key.as_str() {
            SNAPSHOT_NAME_PARAM => name = Some(value.clone()),
            SNAPSHOT_NAMESPACE_PARAM => namespace = Some(value.clone()),
            other if other.starts_with(SIDECAR_PREFIX) => {}
            other => return Err(Invalid::UnknownSnapshotParameter(other.to_owned())),
        }
    }
    Ok(SnapshotRequest {
        id: VolumeId::from_name(&req.name),
        source,
        volume_snapshot: match (namespace, name) {
            (Some(namespace), Some(name)) => Some(PvcRef { namespace, name }),
            _ => None,
        },
    })
}

pub fn delete_snapshot(req: &DeleteSnapshotRequest) -> Result<VolumeId, Invalid> {
    if req.snapshot_id.is_empty() {
        return Err(Invalid::MissingSnapshotId);
    }
    volume_id(&req.snapshot_id)
}

pub fn list_snapshots(req: &ListSnapshotsRequest) -> Result<SnapshotListRequest, Invalid> {
    let ListRequest { max_entries, after } = list(&ListVolumesRequest {
        max_entries: req.max_entries,
        starting_token: req.starting_token.clone(),
    })?;
    let given = |id: &str| (!id.is_empty()).then(|| id.to_owned());
    Ok(SnapshotListRequest {
        max_entries,
        after,
        id: given(&req.snapshot_id),
        source: given(&req.source_volume_id),
    })
}

pub fn modify(req: &ControllerModifyVolumeRequest) -> Result<ModifyRequest, Invalid> {
    let id = volume_id(&req.volume_id)?;
    let io_limits = mutable_parameters(&req.mutable_parameters)?;
    Ok(ModifyRequest { id, io_limits })
}

/// Reads a VolumeAttributesClass's parameters: IO limits only.
fn mutable_parameters(params: &HashMap<String, String>) -> Result<IoLimits, Invalid> {
    let mut limits = IoLimits::NONE;
    for (key, value) in params {
        if !limits.set(key, value)? {
            return Err(Invalid::UnknownMutableParameter(key.clone()));
        }
    }
    Ok(limits)
}

pub fn delete(req: &DeleteVolumeRequest) -> Result<VolumeId, Invalid> {
    volume_id(&req.volume_id)
}

pub fn expand(req: &ControllerExpandVolumeRequest) -> Result<ExpandRequest, Invalid> {
    let id = volume_id(&req.volume_id)?;
    let size = size_range(req.capacity_range.as_ref())?;
    if size.required == 0 && size.limit.is_none() {
        return Err(Invalid::MissingCapacity);
    }
    if let Some(capability) = &req.volume_capability {
        wanted(capability)?;
    }
    Ok(ExpandRequest { id, size })
}

/// The volume id of a ValidateVolumeCapabilities; the capabilities
/// themselves are judged against the volume, since an unsupported one is an
/// answer there, not an error.
pub fn capability_check(req: &ValidateVolumeCapabilitiesRequest) -> Result<VolumeId, Invalid> {
    let id = volume_id(&req.volume_id)?;
    if req.volume_capabilities.is_empty() {
        return Err(Invalid::MissingCapabilities);
    }
    Ok(id)
}

pub fn list(req: &ListVolumesRequest) -> Result<ListRequest, Invalid> {
    let max_entries = match req.max_entries {
        n if n < 0 => return Err(Invalid::NegativeMaxEntries),
        0 => None,
        n => Some(n as usize),
    };
    let after = match req.starting_token.as_str() {
        "" => None,
        token => Some(
            token
                .strip_prefix(TOKEN_PREFIX)
                .and_then(|id| VolumeId::parse(id).ok())
                .ok_or_else(|| Invalid::StartingToken(token.to_owned()))?,
        ),
    };
    Ok(ListRequest { max_entries, after })
}

/// The token that continues a listing after `last`.
pub fn next_token(last: &VolumeId) -> String {
    format!("{TOKEN_PREFIX}{last}")
}

pub fn capacity(req: &GetCapacityRequest) -> Result<CapacityQuery, Invalid> {
    let params = parameters(&req.parameters)?;
    if !req.volume_capabilities.is_empty() {
        access(&req.volume_capabilities, params.fs_type)?;
    }
    let node = match &req.accessible_topology {
        Some(segment) => Some(segment_node(segment)?),
        None => None,
    };
    Ok(CapacityQuery {
        media: params.media,
        node,
        thin: params.thin(),
    })
}

/// The access all `capabilities` agree on; `fs_param` is the StorageClass's
/// filesystem, used when the capabilities name none.
pub fn access(
    capabilities: &[VolumeCapability],
    fs_param: Option<FsType>,
) -> Result<Access, Invalid> {
    if capabilities.is_empty() {
        return Err(Invalid::MissingCapabilities);
    }
    let mut block = false;
    let mut mount = false;
    let mut fs_type = fs_param;
    for capability in capabilities {
        match wanted(capability)? {
            Wanted::Block => block = true,
            Wanted::Mount(named) => {
                mount = true;
                match (fs_type, named) {
                    (Some(a), Some(b)) if a != b => return Err(Invalid::ConflictingFsTypes(a, b)),
                    (None, named) => fs_type = named,
                    _ => {}
                }
            }
        }
    }
    match (block, mount) {
        (true, true) => Err(Invalid::MixedAccessTypes),
        (true, false) => Ok(Access::Block),
        _ => Ok(Access::Filesystem(fs_type.unwrap_or(FsType::DEFAULT))),
    }
}

/// Checks one capability: a single-node access mode and an access type.
pub fn wanted(capability: &VolumeCapability) -> Result<Wanted, Invalid> {
    let AccessMode { mode } = capability.access_mode.ok_or(Invalid::MissingAccessMode)?;
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
            | Mode::SingleNodeReaderOnly,
        ) => {}
        Ok(other) => return Err(Invalid::AccessMode(other.as_str_name())),
        Err(_) => return Err(Invalid::UnknownAccessMode(mode)),
    }
    match &capability.access_type {
        Some(AccessType::Block(_)) => Ok(Wanted::Block),
        Some(AccessType::Mount(mount)) if mount.fs_type.is_empty() => Ok(Wanted::Mount(None)),
        Some(AccessType::Mount(mount)) => Ok(Wanted::Mount(Some(mount.fs_type.parse()?))),
        None => Err(Invalid::MissingAccessType),
    }
}

/// Reads the StorageClass parameters (and the provisioner's metadata), from
/// a CSI request or from the StorageClass itself.
pub fn parameters<'a>(
    params: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<Parameters, Invalid> {
    let mut parsed = Parameters::default();
    let mut pvc_name = None;
    let mut pvc_namespace = None;
    for (key, value) in params {
        match key.as_str() {
            MEDIA_PARAM => parsed.media = Some(value.parse()?),
            FS_TYPE_PARAM => parsed.fs_type = Some(value.parse()?),
            PLACEMENT_PARAM => {
                parsed.placement = Some(
                    value
                        .parse()
                        .map_err(|_| Invalid::Placement(value.clone()))?,
                );
            }
            ON_NODE_LOSS => parsed.on_node_loss = value.parse()?,
            PROVISIONING_PARAM => parsed.provisioning = value.parse()?,
            OVERPROVISION_PARAM => parsed.ratio = Some(value.parse()?),
            PVC_NAME_PARAM => pvc_name = Some(value.clone()),
            PVC_NAMESPACE_PARAM => pvc_namespace = Some(value.clone()),
            PV_NAME_PARAM => {}
            other if other.starts_with(SIDECAR_PREFIX) => {}
            other => {
                if !parsed.io_limits.set(other, value)? {
                    return Err(Invalid::UnknownParameter(other.to_owned()));
                }
            }
        }
    }
    parsed.pvc = match (pvc_namespace, pvc_name) {
        (Some(namespace), Some(name)) => Some(PvcRef { namespace, name }),
        (None, None) => None,
        _ => return Err(Invalid::PartialPvc),
    };
    if parsed.ratio.is_some() && parsed.provisioning != Provisioning::Thin {
        return Err(Invalid::RatioWithoutThin);
    }
    Ok(parsed)
}

fn size_range(range: Option<&CapacityRange>) -> Result<SizeRange, Invalid> {
    let Some(range) = range else {
        return Ok(SizeRange {
            required: 0,
            limit: None,
        });
    };
    let (Ok(required), Ok(limit)) = (
        u64::try_from(range.required_bytes),
        u64::try_from(range.limit_bytes),
    ) else {
        return Err(Invalid::NegativeCapacity);
    };
    // The spec makes 0 the same as unset for both bounds.
    let size = SizeRange {
        required,
        limit: (limit > 0).then_some(limit),
    };
    match size.limit {
        Some(limit) if limit < required => Err(Invalid::LimitBelowRequired(size)),
        _ => Ok(size),
    }
}

fn topology_nodes(segments: &[Topology]) -> Result<Vec<String>, Invalid> {
    segments.iter().map(segment_node).collect()
}

fn segment_node(topology: &Topology) -> Result<String, Invalid> {
    match topology.segments.get(TOPOLOGY_KEY) {
        Some(node) if !node.is_empty() => Ok(node.clone()),
        _ => Err(Invalid::Segment(topology.segments.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::v1::volume_capability::{BlockVolume, MountVolume};
    use crate::csi::v1::{TopologyRequirement, VolumeContentSource, volume_content_source};
    use crate::io_limits::{READ_BPS, READ_IOPS, WRITE_BPS, WRITE_IOPS};

    const PVC: &str = "pvc-0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10";

    fn mount(mode: Mode, fs: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..MountVolume::default()
            })),
        }
    }

    fn block(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn segment(node: &str) -> Topology {
        Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node.to_owned())]),
        }
    }

    fn create_req() -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: PVC.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount(Mode::SingleNodeWriter, "")],
            parameters: params(&[(MEDIA_PARAM, "nvme")]),
            ..CreateVolumeRequest::default()
        }
    }

    #[test]
    fn create_reads_a_provisioner_request() {
        let mut req = create_req();
        req.parameters = params(&[
            (MEDIA_PARAM, "ssd"),
            (FS_TYPE_PARAM, "xfs"),
            (PLACEMENT_PARAM, "spread"),
            (ON_NODE_LOSS, "recreate"),
            (PVC_NAME_PARAM, "data-0"),
            (PVC_NAMESPACE_PARAM, "db"),
            (PV_NAME_PARAM, PVC),
            ("csi.storage.k8s.io/pvc/uid", "ignored"),
        ]);
        req.accessibility_requirements = Some(TopologyRequirement {
            requisite: vec![segment("n1"), segment("n2")],
            preferred: vec![segment("n2")],
        });
        let got = create(&req).unwrap();
        assert_eq!(
            got,
            CreateRequest {
                name: PVC.into(),
                id: VolumeId::parse(PVC).unwrap(),
                media: MediaClass::Ssd,
                access: Access::Filesystem(FsType::Xfs),
                size: SizeRange {
                    required: 1 << 30,
                    limit: None
                },
                nodes: NodeChoice {
                    preferred: vec!["n2".into()],
                    requisite: vec!["n1".into(), "n2".into()],
                },
                pvc: Some(PvcRef {
                    namespace: "db".into(),
                    name: "data-0".into()
                }),
                on_node_loss: OnNodeLoss::Recreate,
                io_limits: IoLimits::NONE,
                thin: None,
                source: None,
            }
        );
    }

    #[test]
    fn create_defaults() {
        let mut req = create_req();
        req.capacity_range = None;
        let got = create(&req).unwrap();
        assert_eq!(got.access, Access::Filesystem(FsType::Ext4));
        assert_eq!(
            got.size,
            SizeRange {
                required: 0,
                limit: None
            }
        );
        assert_eq!(got.nodes, NodeChoice::default());
        assert_eq!(got.pvc, None);
        assert_eq!(got.on_node_loss, OnNodeLoss::Keep);
        req.capacity_range = Some(CapacityRange::default());
        assert_eq!(
            create(&req).unwrap().size,
            SizeRange {
                required: 0,
                limit: None
            }
        );
    }

    #[test]
    fn create_refusals_and_their_codes() {
        type Edit = fn(&mut CreateVolumeRequest);
        let cases: Vec<(&str, Edit, Invalid, Code)> = vec![
            (
                "no name",
                |r| r.name.clear(),
                Invalid::MissingName,
                Code::InvalidArgument,
            ),
            (
                "negative size",
                |r| r.capacity_range.as_mut().unwrap().required_bytes = -1,
                Invalid::NegativeCapacity,
                Code::InvalidArgument,
            ),
            (
                "limit below required",
                |r| r.capacity_range.as_mut().unwrap().limit_bytes = 1,
                Invalid::LimitBelowRequired(SizeRange {
                    required: 1 << 30,
                    limit: Some(1),
                }),
                Code::OutOfRange,
            ),
            (
                "no capabilities",
                |r| r.volume_capabilities.clear(),
                Invalid::MissingCapabilities,
                Code::InvalidArgument,
            ),
            (
                "multi-node reader",
                |r| r.volume_capabilities = vec![mount(Mode::MultiNodeReaderOnly, "")],
                Invalid::AccessMode("MULTI_NODE_READER_ONLY"),
                Code::InvalidArgument,
            ),
            (
                "multi-node writer",
                |r| r.volume_capabilities = vec![block(Mode::MultiNodeMultiWriter)],
                Invalid::AccessMode("MULTI_NODE_MULTI_WRITER"),
                Code::InvalidArgument,
            ),
            (
                "multi-node single writer",
                |r| r.volume_capabilities = vec![block(Mode::MultiNodeSingleWriter)],
                Invalid::AccessMode("MULTI_NODE_SINGLE_WRITER"),
                Code::InvalidArgument,
            ),
            (
                "unknown mode",
                |r| r.volume_capabilities = vec![block(Mode::Unknown)],
                Invalid::AccessMode("UNKNOWN"),
                Code::InvalidArgument,
            ),
            (
                "mode out of the enum",
                |r| r.volume_capabilities[0].access_mode = Some(AccessMode { mode: 99 }),
                Invalid::UnknownAccessMode(99),
                Code::InvalidArgument,
            ),
            (
                "no access mode",
                |r| r.volume_capabilities[0].access_mode = None,
                Invalid::MissingAccessMode,
                Code::InvalidArgument,
            ),
            (
                "no access type",
                |r| r.volume_capabilities[0].access_type = None,
                Invalid::MissingAccessType,
                Code::InvalidArgument,
            ),
            (
                "block and mount",
                |r| r.volume_capabilities.push(block(Mode::SingleNodeWriter)),
                Invalid::MixedAccessTypes,
                Code::InvalidArgument,
            ),
            (
                "shell in fs type",
                |r| r.volume_capabilities = vec![mount(Mode::SingleNodeWriter, "ext4; rm -rf /")],
                Invalid::FsType(UnsupportedFsType("ext4; rm -rf /".into())),
                Code::InvalidArgument,
            ),
            (
                "fs type parameter outside the allowlist",
                |r| {
                    r.parameters.insert(FS_TYPE_PARAM.into(), "btrfs".into());
                },
                Invalid::FsType(UnsupportedFsType("btrfs".into())),
                Code::InvalidArgument,
            ),
            (
                "capability and parameter disagree",
                |r| {
                    r.parameters.insert(FS_TYPE_PARAM.into(), "xfs".into());
                    r.volume_capabilities = vec![mount(Mode::SingleNodeWriter, "ext4")];
                },
                Invalid::ConflictingFsTypes(FsType::Xfs, FsType::Ext4),
                Code::InvalidArgument,
            ),
            (
                "no media",
                |r| r.parameters.clear(),
                Invalid::MissingMedia,
                Code::InvalidArgument,
            ),
            (
                "unknown media",
                |r| {
                    r.parameters.insert(MEDIA_PARAM.into(), "tape".into());
                },
                Invalid::Media("tape".parse::<MediaClass>().unwrap_err()),
                Code::InvalidArgument,
            ),
            (
                "bad placement",
                |r| {
                    r.parameters.insert(PLACEMENT_PARAM.into(), "random".into());
                },
                Invalid::Placement("random".into()),
                Code::InvalidArgument,
            ),
            (
                "bad choice on node loss",
                |r| {
                    r.parameters.insert(ON_NODE_LOSS.into(), "delete".into());
                },
                Invalid::OnNodeLoss("delete".parse::<OnNodeLoss>().unwrap_err()),
                Code::InvalidArgument,
            ),
            (
                "typo in our parameter",
                |r| {
                    r.parameters.insert("lvmlocal.io/meda".into(), "ssd".into());
                },
                Invalid::UnknownParameter("lvmlocal.io/meda".into()),
                Code::InvalidArgument,
            ),
            (
                "foreign parameter",
                |r| {
                    r.parameters.insert("type".into(), "gp3".into());
                },
                Invalid::UnknownParameter("type".into()),
                Code::InvalidArgument,
            ),
            (
                "half a pvc",
                |r| {
                    r.parameters.insert(PVC_NAME_PARAM.into(), "data-0".into());
                },
                Invalid::PartialPvc,
                Code::InvalidArgument,
            ),
            (
                "a content source of no kind",
                |r| r.volume_content_source = Some(VolumeContentSource { r#type: None }),
                Invalid::ContentSource,
                Code::InvalidArgument,
            ),
            (
                "a snapshot id that is a path",
                |r| {
                    r.volume_content_source = Some(VolumeContentSource {
                        r#type: Some(volume_content_source::Type::Snapshot(
                            volume_content_source::SnapshotSource {
                                snapshot_id: "../s".into(),
                            },
                        )),
                    })
                },
                Invalid::Id(InvalidVolumeId::Alphabet("../s".into())),
                Code::InvalidArgument,
            ),
            (
                "segment without our key",
                |r| {
                    r.accessibility_requirements = Some(TopologyRequirement {
                        requisite: vec![Topology {
                            segments: HashMap::from([("zone".into(), "a".into())]),
                        }],
                        preferred: vec![],
                    })
                },
                Invalid::Segment(HashMap::from([("zone".into(), "a".into())])),
                Code::InvalidArgument,
            ),
            (
                "a mutable parameter that is no IO limit",
                |r| {
                    r.mutable_parameters.insert("iops".into(), "1".into());
                },
                Invalid::UnknownMutableParameter("iops".into()),
                Code::InvalidArgument,
            ),
            (
                "a bad IO limit in the class",
                |r| {
                    r.parameters.insert(WRITE_IOPS.into(), "0".into());
                },
                Invalid::IoLimit(InvalidIoLimit::Iops {
                    key: WRITE_IOPS,
                    value: "0".into(),
                }),
                Code::InvalidArgument,
            ),
            (
                "a bad IO limit in the attributes class",
                |r| {
                    r.mutable_parameters.insert(READ_BPS.into(), "1MB".into());
                },
                Invalid::IoLimit(InvalidIoLimit::Bps {
                    key: READ_BPS,
                    value: "1MB".into(),
                }),
                Code::InvalidArgument,
            ),
        ];
        for (what, edit, want, code) in cases {
            let mut req = create_req();
            edit(&mut req);
            let err = create(&req).unwrap_err();
            assert_eq!(err, want, "{what}");
            assert_eq!(err.code(), code, "{what}");
        }
    }

    #[test]
    fn thin_classes_name_their_ratio_and_thick_ones_none() {
        assert_eq!(create(&create_req()).unwrap().thin, None);
        let mut req = create_req();
        req.parameters
            .insert(PROVISIONING_PARAM.into(), "thin".into());
        assert_eq!(create(&req).unwrap().thin, Some(Ratio::ONE));
        req.parameters
            .insert(OVERPROVISION_PARAM.into(), "3".into());
        assert_eq!(create(&req).unwrap().thin, Some("3".parse().unwrap()));
        req.parameters
            .insert(PROVISIONING_PARAM.into(), "thick".into());
        assert_eq!(create(&req), Err(Invalid::RatioWithoutThin));
        req.parameters
            .insert(PROVISIONING_PARAM.into(), "sparse".into());
        let err = create(&req).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains(PROVISIONING_PARAM), "{err}");
        req.parameters
            .insert(PROVISIONING_PARAM.into(), "thin".into());
        req.parameters
            .insert(OVERPROVISION_PARAM.into(), "0.5".into());
        let err = create(&req).unwrap_err();
        assert!(err.to_string().contains(OVERPROVISION_PARAM), "{err}");
    }

    #[test]
    fn io_limits_come_from_the_class_overlaid_by_the_attributes_class() {
        let mut req = create_req();
        req.parameters.insert(WRITE_IOPS.into(), "100".into());
        req.parameters.insert(READ_IOPS.into(), "200".into());
        req.mutable_parameters = params(&[(WRITE_IOPS, "50"), (WRITE_BPS, "1Mi")]);
        assert_eq!(
            create(&req).unwrap().io_limits,
            IoLimits {
                read_iops: Some(200),
                write_iops: Some(50),
                read_bps: None,
                write_bps: Some(1 << 20),
            }
        );
        assert_eq!(create(&create_req()).unwrap().io_limits, IoLimits::NONE);
    }

    #[test]
    fn a_modify_names_all_the_limits_and_nothing_else() {
        let modify_req = |pairs: &[(&str, &str)]| ControllerModifyVolumeRequest {
            volume_id: PVC.into(),
            mutable_parameters: params(pairs),
            ..ControllerModifyVolumeRequest::default()
        };
        assert_eq!(
            modify(&modify_req(&[(READ_BPS, "10M")])),
            Ok(ModifyRequest {
                id: VolumeId::parse(PVC).unwrap(),
                io_limits: IoLimits {
                    read_bps: Some(10_000_000),
                    ..IoLimits::NONE
                },
            })
        );
        assert_eq!(modify(&modify_req(&[])).unwrap().io_limits, IoLimits::NONE);
        assert_eq!(
            modify(&modify_req(&[(MEDIA_PARAM, "ssd")])),
            Err(Invalid::UnknownMutableParameter(MEDIA_PARAM.into()))
        );
        assert!(matches!(
            modify(&modify_req(&[(WRITE_IOPS, "many")])),
            Err(Invalid::IoLimit(_))
        ));
        let mut bad_id = modify_req(&[]);
        bad_id.volume_id = "../x".into();
        assert_eq!(modify(&bad_id).unwrap_err().code(), Code::InvalidArgument);
    }

    #[test]
    fn single_node_modes_are_accepted() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
            Mode::SingleNodeReaderOnly,
        ] {
            assert_eq!(wanted(&block(mode)), Ok(Wanted::Block), "{mode:?}");
            assert_eq!(
                wanted(&mount(mode, "xfs")),
                Ok(Wanted::Mount(Some(FsType::Xfs))),
                "{mode:?}"
            );
        }
    }

    #[test]
    fn access_combines_capabilities() {
        let w = Mode::SingleNodeWriter;
        let cases = [
            (vec![block(w)], None, Ok(Access::Block)),
            (
                vec![block(w), block(Mode::SingleNodeReaderOnly)],
                None,
                Ok(Access::Block),
            ),
            (
                vec![mount(w, "")],
                None,
                Ok(Access::Filesystem(FsType::Ext4)),
            ),
            (
                vec![mount(w, "")],
                Some(FsType::Xfs),
                Ok(Access::Filesystem(FsType::Xfs)),
            ),
            (
                vec![mount(w, ""), mount(w, "xfs")],
                None,
                Ok(Access::Filesystem(FsType::Xfs)),
            ),
            (
                vec![mount(w, "xfs")],
                Some(FsType::Xfs),
                Ok(Access::Filesystem(FsType::Xfs)),
            ),
            (
                vec![mount(w, "xfs"), mount(w, "ext4")],
                None,
                Err(Invalid::ConflictingFsTypes(FsType::Xfs, FsType::Ext4)),
            ),
            // The parameter does not turn a block volume into a filesystem.
            (vec![block(w)], Some(FsType::Xfs), Ok(Access::Block)),
        ];
        for (capabilities, fs_param, want) in cases {
            assert_eq!(access(&capabilities, fs_param), want, "{capabilities:?}");
        }
    }

    #[test]
    fn hashed_id_for_names_that_are_not_ids() {
        let mut req = create_req();
        req.name = "x".repeat(128);
        let got = create(&req).unwrap();
        assert!(got.id.as_str().starts_with("vol-"), "{}", got.id);
        assert_eq!(got.name.len(), 128);
    }

    #[test]
    fn volume_ids_from_requests() {
        assert_eq!(volume_id(""), Err(Invalid::MissingId));
        assert_eq!(volume_id(PVC).unwrap().as_str(), PVC);
        for bad in ["..", "a/../b", "/etc/passwd", "a b", "Vol"] {
            let err = volume_id(bad).unwrap_err();
            assert!(matches!(err, Invalid::Id(_)), "{bad}: {err}");
            assert_eq!(err.code(), Code::InvalidArgument);
        }
        let delete_req = DeleteVolumeRequest {
            volume_id: "../x".into(),
            ..Default::default()
        };
        assert_eq!(
            delete(&delete_req).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn expand_needs_an_id_and_a_range() {
        let req = |id: &str, range: Option<CapacityRange>| ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: range,
            ..Default::default()
        };
        let two_gib = Some(CapacityRange {
            required_bytes: 2 << 30,
            limit_bytes: 0,
        });
        assert_eq!(
            expand(&req(PVC, two_gib)),
            Ok(ExpandRequest {
                id: VolumeId::parse(PVC).unwrap(),
                size: SizeRange {
                    required: 2 << 30,
                    limit: None
                }
            })
        );
        assert_eq!(expand(&req("", two_gib)), Err(Invalid::MissingId));
        assert_eq!(expand(&req(PVC, None)), Err(Invalid::MissingCapacity));
        assert_eq!(
            expand(&req(PVC, Some(CapacityRange::default()))),
            Err(Invalid::MissingCapacity)
        );
        let mut with_capability = req(PVC, two_gib);
        with_capability.volume_capability = Some(mount(Mode::MultiNodeMultiWriter, ""));
        assert_eq!(
            expand(&with_capability).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn capability_check_needs_an_id_and_capabilities() {
        let mut req = ValidateVolumeCapabilitiesRequest {
            volume_id: PVC.into(),
            volume_capabilities: vec![block(Mode::SingleNodeWriter)],
            ..Default::default()
        };
        assert_eq!(capability_check(&req).unwrap().as_str(), PVC);
        req.volume_capabilities.clear();
        assert_eq!(capability_check(&req), Err(Invalid::MissingCapabilities));
        req.volume_id.clear();
        assert_eq!(capability_check(&req), Err(Invalid::MissingId));
    }

    #[test]
    fn list_tokens_round_trip_and_foreign_ones_abort() {
        let req = |max: i32, token: &str| ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        };
        assert_eq!(
            list(&req(0, "")),
            Ok(ListRequest {
                max_entries: None,
                after: None
            })
        );
        let id = VolumeId::parse(PVC).unwrap();
        assert_eq!(
            list(&req(5, &next_token(&id))),
            Ok(ListRequest {
                max_entries: Some(5),
                after: Some(id)
            })
        );
        assert_eq!(list(&req(-1, "")), Err(Invalid::NegativeMaxEntries));
        // csi-sanity sends both of these and expects ABORTED.
        for token in ["invalid-token", "10", "after:..", "after:"] {
            let err = list(&req(0, token)).unwrap_err();
            assert_eq!(err, Invalid::StartingToken(token.into()));
            assert_eq!(err.code(), Code::Aborted);
        }
    }

    #[test]
    fn capacity_query_reads_segment_and_media() {
        let mut req = GetCapacityRequest::default();
        assert_eq!(
            capacity(&req),
            Ok(CapacityQuery {
                media: None,
                node: None,
                thin: None,
            })
        );
        req.parameters = params(&[(MEDIA_PARAM, "hdd")]);
        req.accessible_topology = Some(segment("n1"));
        req.volume_capabilities = vec![mount(Mode::SingleNodeWriter, "xfs")];
        assert_eq!(
            capacity(&req),
            Ok(CapacityQuery {
                media: Some(MediaClass::Hdd),
                node: Some("n1".into()),
                thin: None,
            })
        );
        req.parameters = params(&[
            (MEDIA_PARAM, "hdd"),
            (PROVISIONING_PARAM, "thin"),
            (OVERPROVISION_PARAM, "2.5"),
        ]);
        assert_eq!(capacity(&req).unwrap().thin, Some("2.5".parse().unwrap()));
        req.accessible_topology = Some(Topology::default());
        assert_eq!(capacity(&req), Err(Invalid::Segment(HashMap::new())));
        req.accessible_topology = None;
        req.volume_capabilities = vec![mount(Mode::MultiNodeMultiWriter, "")];
        assert_eq!(capacity(&req).unwrap_err().code(), Code::InvalidArgument);
    }
}
