//! The StorageClass parameters lvmlocal reads, and the placement policy one
//! of them names. The controller checks them at CreateVolume, the scheduler
//! extender reads them to place pods: one spelling for both.

use std::fmt;
use std::str::FromStr;

/// StorageClass parameter naming the media class; required, because a
/// volume silently landing on HDD when NVMe was meant is worse than an error.
pub const MEDIA_PARAM: &str = "lvmlocal.io/media";
/// StorageClass parameter with the filesystem (`ext4` or `xfs`).
pub const FS_TYPE_PARAM: &str = "csi.storage.k8s.io/fstype";
/// StorageClass parameter overriding the extender's default placement.
pub const PLACEMENT_PARAM: &str = "lvmlocal.io/placement";
/// Added by csi-provisioner's `--extra-create-metadata`.
pub const PVC_NAME_PARAM: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE_PARAM: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME_PARAM: &str = "csi.storage.k8s.io/pv/name";

/// Placement policy for the volumes of one StorageClass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "runtime", derive(clap::ValueEnum))]
pub enum Placement {
    /// Fill nodes up, keeping whole disks free elsewhere for large volumes.
    Binpack,
    /// Keep the most room on every node.
    Spread,
}

impl Placement {
    pub const fn as_str(self) -> &'static str {
        match self {
            Placement::Binpack => "binpack",
            Placement::Spread => "spread",
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement {0:?}; expected binpack or spread")]
pub struct ParsePlacementError(String);

impl FromStr for Placement {
    type Err = ParsePlacementError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "binpack" => Ok(Placement::Binpack),
            "spread" => Ok(Placement::Spread),
            _ => Err(ParsePlacementError(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parses_only_its_two_names() {
        assert_eq!("binpack".parse(), Ok(Placement::Binpack));
        assert_eq!("spread".parse(), Ok(Placement::Spread));
        for bad in ["", "Binpack", "pack", "spread "] {
            assert!(bad.parse::<Placement>().is_err(), "{bad:?}");
        }
        assert_eq!(Placement::Spread.to_string(), "spread");
    }
}
