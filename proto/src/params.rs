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
/// StorageClass parameter, and claim annotation, choosing what happens to a
/// claim whose volume is lost with its node or disk: [`OnNodeLoss`].
pub const ON_NODE_LOSS: &str = "lvmlocal.io/on-node-loss";
/// Added by csi-provisioner's `--extra-create-metadata`.
pub const PVC_NAME_PARAM: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE_PARAM: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME_PARAM: &str = "csi.storage.k8s.io/pv/name";
/// The pod's UID in NodePublishVolume's volume context, from kubelet (the
/// CSIDriver's `podInfoOnMount`).
pub const POD_UID_CONTEXT: &str = "csi.storage.k8s.io/pod.uid";

/// Placement policy for the volumes of one StorageClass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "runtime", derive(clap::ValueEnum))]
pub enum Placement {
    /// Fill nodes up, keeping whole disks free elsewhere for large volumes.
    Binpack,
    /// Keep the most room on every node.
    Spread,
    /// Prefer the nodes whose disks of the class are least busy.
    Balanced,
}

impl Placement {
    pub const fn as_str(self) -> &'static str {
        match self {
            Placement::Binpack => "binpack",
            Placement::Spread => "spread",
            Placement::Balanced => "balanced",
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement {0:?}; expected binpack, spread or balanced")]
pub struct ParsePlacementError(String);

impl FromStr for Placement {
    type Err = ParsePlacementError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "binpack" => Ok(Placement::Binpack),
            "spread" => Ok(Placement::Spread),
            "balanced" => Ok(Placement::Balanced),
            _ => Err(ParsePlacementError(s.to_owned())),
        }
    }
}

/// What becomes of a claim whose volume is lost, and of a volume left with
/// no claim: kept for an operator to decide (the default), or given up so
/// that a StatefulSet recreates the claim elsewhere and the leftover is
/// collected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OnNodeLoss {
    #[default]
    Keep,
    Recreate,
}

impl OnNodeLoss {
    pub const fn as_str(self) -> &'static str {
        match self {
            OnNodeLoss::Keep => "keep",
            OnNodeLoss::Recreate => "recreate",
        }
    }
}

impl fmt::Display for OnNodeLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ON_NODE_LOSS} must be keep or recreate, not {0:?}")]
pub struct ParseOnNodeLossError(String);

impl FromStr for OnNodeLoss {
    type Err = ParseOnNodeLossError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "keep" => Ok(OnNodeLoss::Keep),
            "recreate" => Ok(OnNodeLoss::Recreate),
            _ => Err(ParseOnNodeLossError(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parses_only_its_names() {
        assert_eq!("binpack".parse(), Ok(Placement::Binpack));
        assert_eq!("spread".parse(), Ok(Placement::Spread));
        assert_eq!("balanced".parse(), Ok(Placement::Balanced));
        for bad in ["", "Binpack", "pack", "spread "] {
            assert!(bad.parse::<Placement>().is_err(), "{bad:?}");
        }
        assert_eq!(Placement::Spread.to_string(), "spread");
    }

    #[test]
    fn on_node_loss_is_keep_unless_recreate_is_spelt() {
        assert_eq!(OnNodeLoss::default(), OnNodeLoss::Keep);
        assert_eq!(" recreate".parse(), Ok(OnNodeLoss::Recreate));
        assert_eq!("keep".parse(), Ok(OnNodeLoss::Keep));
        for bad in ["", "Recreate", "delete", "yes"] {
            let err = bad.parse::<OnNodeLoss>().unwrap_err();
            assert!(err.to_string().contains(ON_NODE_LOSS), "{err}");
        }
    }
}
