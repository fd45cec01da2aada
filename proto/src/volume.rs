//! What a volume is, whichever store keeps it: its id, how it is accessed,
//! and the state its node reports.

use crate::crd::VolumeCondition;
use std::fmt;
use std::str::FromStr;

use crate::MediaClass;
use crate::crd::{ContentSource, PvcRef};
use crate::io_limits::IoLimits;
use crate::params::OnNodeLoss;
use crate::thin::Ratio;
use sha2::{Digest, Sha256};

/// Longest volume id: a Kubernetes label-sized name, which is also a valid
/// LVM LV name and leaves room for the VG name in the device-mapper name.
pub const MAX_ID_LEN: usize = 63;

/// Prefix of ids derived by hashing a CreateVolume name that is not an id.
const HASHED_ID_PREFIX: &str = "vol-";

/// Beginnings of LV names LVM keeps for itself.
const RESERVED_LV_PREFIXES: [&str; 2] = ["snapshot", "pvmove"];

/// csi-snapshotter names snapshots `snapshot-<uuid>`, which LVM refuses:
/// such a name becomes `snap-<uuid>`.
const SNAPSHOTTER_PREFIX: &str = "snapshot-";
const SNAPSHOT_ID_PREFIX: &str = "snap-";

/// A CSI volume id: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters,
/// not an LVM reserved name. It is at once the `LogicalVolume` object name,
/// the LV name and a path component, so nothing else may get through.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidVolumeId {
    #[error("volume id is empty")]
    Empty,
    #[error("volume id {0:?} is longer than {MAX_ID_LEN} characters")]
    TooLong(String),
    #[error("volume id {0:?} is not an lvmlocal id: only lowercase letters, digits and '-' inside")]
    Alphabet(String),
    #[error("volume id {0:?} is reserved by LVM")]
    Reserved(String),
}

impl VolumeId {
    /// Checks an id that came from outside (a CO request, a token, a store).
    pub fn parse(id: &str) -> Result<Self, InvalidVolumeId> {
        if id.is_empty() {
            return Err(InvalidVolumeId::Empty);
        }
        if id.len() > MAX_ID_LEN {
            return Err(InvalidVolumeId::TooLong(id.to_owned()));
        }
        let inner_ok = id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ends_ok = !id.starts_with('-') && !id.ends_with('-');
        if !inner_ok || !ends_ok {
            return Err(InvalidVolumeId::Alphabet(id.to_owned()));
        }
        if RESERVED_LV_PREFIXES
            .iter()
            .any(|prefix| id.starts_with(prefix))
        {
            return Err(InvalidVolumeId::Reserved(id.to_owned()));
        }
        Ok(Self(id.to_owned()))
    }

    /// The id of the volume a CreateVolume `name` asks for. Deterministic, so
    /// a retried call finds the volume the first one made. csi-provisioner's
    /// `pvc-<uuid>` names are valid ids and kept as they are, so the PV, the
    /// `LogicalVolume` and the LV share one name; any other name becomes
    /// `vol-` and 128 bits of its SHA-256.
    pub fn from_name(name: &str) -> Self {
        if let Ok(id) = Self::parse(name) {
            return id;
        }
        if let Some(uuid) = name.strip_prefix(SNAPSHOTTER_PREFIX)
            && let Ok(id) = Self::parse(&format!("{SNAPSHOT_ID_PREFIX}{uuid}"))
        {
            return id;
        }
        let digest = Sha256::digest(name.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("{HASHED_ID_PREFIX}{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The filesystems lvmlocal formats. Anything else is refused before it can
/// reach a command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsType {
    Ext4,
    Xfs,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filesystem type {0:?} is not supported; use ext4 or xfs")]
pub struct UnsupportedFsType(pub String);

impl FsType {
    /// Used when the CO names no filesystem.
    pub const DEFAULT: FsType = FsType::Ext4;

    pub const fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = UnsupportedFsType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(UnsupportedFsType(other.to_owned())),
        }
    }
}

/// How the workload sees the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Block,
    Filesystem(FsType),
}

impl Access {
    /// The filesystem to format, `None` for a raw block device.
    pub fn fs_type(self) -> Option<FsType> {
        match self {
            Access::Block => None,
            Access::Filesystem(fs) => Some(fs),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::Block => f.write_str("block"),
            Access::Filesystem(fs) => write!(f, "{fs} filesystem"),
        }
    }
}

/// A volume as its store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: VolumeId,
    pub node: String,
    pub media: MediaClass,
    pub access: Access,
    /// What the node is asked for: the requested size rounded up to the extent.
    pub size_bytes: u64,
    pub state: VolumeState,
    /// The LV's size as its node last reported it; None before it has.
    /// Smaller than `size_bytes` while an expansion is not done.
    pub actual_bytes: Option<u64>,
    /// The store's count of changes to what is asked (Kubernetes'
    /// `metadata.generation`); a report about an older generation is stale.
    pub generation: i64,
    /// The node's last word on the volume's health; None until it has one.
    pub condition: Option<VolumeCondition>,
    /// The IO limits asked for the volume.
    pub io_limits: IoLimits,
    /// A thin volume's overprovisioning ratio; None for a thick volume.
    pub thin: Option<Ratio>,
    /// Set on a snapshot: the volume it is of.
    pub snapshot_of: Option<VolumeId>,
    /// What the volume was made from.
    pub source: Option<ContentSource>,
    /// When the store first kept it, in seconds since the epoch.
    pub created_seconds: Option<i64>,
}

impl Volume {
    /// Whether a caller waiting on this volume has its answer: the LV has
    /// the asked size, or the node gave up, or the volume is going away.
    pub fn settled(&self) -> bool {
        match &self.state {
            VolumeState::Pending => false,
            VolumeState::Ready { size_bytes } => *size_bytes >= self.size_bytes,
            VolumeState::Failed { .. } | VolumeState::Deleting => true,
        }
    }
}

/// What the node has done about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeState {
    /// The node has not yet answered the current request.
    Pending,
    /// The LV exists with this size.
    Ready { size_bytes: u64 },
    /// The node cannot carry out the current request.
    Failed {
        message: String,
        /// The LV exists (an expansion failed), so it holds data.
        lv_exists: bool,
    },
    /// Deletion was requested; the node is removing the LV.
    Deleting,
}

/// What CreateVolume asks a store to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub id: VolumeId,
    pub node: String,
    pub media: MediaClass,
    pub access: Access,
    pub size_bytes: u64,
    pub pvc: Option<PvcRef>,
    /// The class's choice, kept with the volume: a claim deleted meanwhile
    /// can no longer say it.
    pub on_node_loss: OnNodeLoss,
    pub io_limits: IoLimits,
    pub thin: Option<Ratio>,
    /// Set for a snapshot: the volume it is of, and the VolumeSnapshot it
    /// was made for, if known.
    pub snapshot_of: Option<(VolumeId, Option<PvcRef>)>,
    pub source: Option<ContentSource>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_driver_alphabet_only() {
        for good in [
            "pvc-0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10",
            "a",
            "0",
            "vol-1",
            &"a".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(VolumeId::parse(good).unwrap().as_str(), good);
        }
        type Reason = fn(String) -> InvalidVolumeId;
        let cases: [(&str, Reason); 12] = [
            ("..", InvalidVolumeId::Alphabet),
            ("../etc", InvalidVolumeId::Alphabet),
            ("a/b", InvalidVolumeId::Alphabet),
            ("/dev/sda", InvalidVolumeId::Alphabet),
            ("-a", InvalidVolumeId::Alphabet),
            ("a-", InvalidVolumeId::Alphabet),
            ("PVC-1", InvalidVolumeId::Alphabet),
            ("a_b", InvalidVolumeId::Alphabet),
            ("a b", InvalidVolumeId::Alphabet),
            ("a;rm -rf /", InvalidVolumeId::Alphabet),
            ("snapshot", InvalidVolumeId::Reserved),
            ("pvmove", InvalidVolumeId::Reserved),
        ];
        for (bad, want) in cases {
            assert_eq!(VolumeId::parse(bad), Err(want(bad.to_owned())), "{bad}");
        }
        assert_eq!(VolumeId::parse(""), Err(InvalidVolumeId::Empty));
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert_eq!(VolumeId::parse(&long), Err(InvalidVolumeId::TooLong(long)));
    }

    #[test]
    fn from_name_keeps_provisioner_names() {
        let name = "pvc-0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10";
        assert_eq!(VolumeId::from_name(name).as_str(), name);
        // LVM refuses names beginning with "snapshot".
        assert_eq!(
            VolumeId::from_name("snapshot-0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10").as_str(),
            "snap-0f5c1e2a-9d3b-4c1e-8a7f-6b5d4c3b2a10"
        );
        for reserved in ["snapshot1", "pvmove-a", "snapshot-x"] {
            assert_eq!(
                VolumeId::parse(reserved),
                Err(InvalidVolumeId::Reserved(reserved.to_owned())),
            );
        }
    }

    #[test]
    fn from_name_hashes_everything_else_deterministically() {
        for name in [
            "My Volume",
            "snapshot",
            "..",
            "ns/name",
            &"x".repeat(128),
            "UPPER",
        ] {
            let id = VolumeId::from_name(name);
            assert_eq!(id, VolumeId::from_name(name), "{name}");
            assert!(id.as_str().starts_with(HASHED_ID_PREFIX), "{id}");
            assert_eq!(id.as_str().len(), HASHED_ID_PREFIX.len() + 32);
            assert_eq!(VolumeId::parse(id.as_str()), Ok(id));
        }
        assert_ne!(VolumeId::from_name("a b"), VolumeId::from_name("a  b"));
        // Pinned, so the scheme cannot change under existing volumes.
        assert_eq!(
            VolumeId::from_name("My Volume").as_str(),
            "vol-f436f1b4e06fc9f390b2f6479707ff47"
        );
    }

    #[test]
    fn fs_type_allowlist() {
        assert_eq!("ext4".parse(), Ok(FsType::Ext4));
        assert_eq!("xfs".parse(), Ok(FsType::Xfs));
        for bad in ["", "ext3", "EXT4", "btrfs", "ext4; rm -rf /", "xfs "] {
            assert_eq!(
                bad.parse::<FsType>(),
                Err(UnsupportedFsType(bad.to_owned()))
            );
        }
    }

    #[test]
    fn settled_means_the_caller_has_an_answer() {
        let mut volume = Volume {
            id: VolumeId::parse("v").unwrap(),
            node: "n".into(),
            media: MediaClass::Nvme,
            access: Access::Block,
            size_bytes: 100,
            state: VolumeState::Pending,
            actual_bytes: None,
            generation: 1,
            condition: None,
            io_limits: IoLimits::NONE,
            thin: None,
            snapshot_of: None,
            source: None,
            created_seconds: None,
        };
        assert!(!volume.settled());
        volume.state = VolumeState::Ready { size_bytes: 50 };
        assert!(!volume.settled(), "an expansion still under way");
        volume.state = VolumeState::Ready { size_bytes: 100 };
        assert!(volume.settled());
        volume.state = VolumeState::Failed {
            message: "no space".into(),
            lv_exists: false,
        };
        assert!(volume.settled());
        volume.state = VolumeState::Deleting;
        assert!(volume.settled());
    }
}
