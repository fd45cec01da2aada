//! Where a volume goes and how big it is: the node from the topology
//! requirement, the capacity arithmetic, and the rounding to LVM extents.
//! Pure functions over plain data.

use tonic::Code;

use crate::MediaClass;
use crate::extent::{self, DEFAULT_EXTENT_BYTES};
use crate::validate::{NodeChoice, SizeRange};

/// The volume group of one media class on one node, as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub node: String,
    pub total_bytes: u64,
    /// Free space as LVM last reported it.
    pub reported_free_bytes: u64,
    /// Sum of the sizes of the volumes the store has placed on this group,
    /// including those the node has not made yet.
    pub allocated_bytes: u64,
    /// What the node reports no volume accounts for (LVs made by hand,
    /// orphans): taken as well.
    pub unaccounted_bytes: u64,
    /// Of the unaccounted bytes, the thin pool's data that no thin
    /// volume's charge takes: room for thin volumes, not for thick ones.
    pub thin_free_bytes: u64,
    pub extent_bytes: u64,
    /// Some disk of the group is missing: no new volumes there.
    pub degraded: bool,
    /// Why the node's agent counts as silent, if it does: no new volumes
    /// there either, since nobody would make them.
    pub silent: Option<String>,
}

impl NodeCapacity {
    /// What a new volume can still get. The volumes placed there count at
    /// once, before the node reports them, so two calls in the same second
    /// cannot both take the last space; LVM's own figure still caps it, so
    /// an LV that no store knows of (an orphan) is not handed out twice.
    pub fn free_bytes(&self) -> u64 {
        if self.degraded || self.silent.is_some() {
            return 0;
        }
        self.reported_free_bytes.min(
            self.total_bytes
                .saturating_sub(self.allocated_bytes)
                .saturating_sub(self.unaccounted_bytes),
        )
    }

    /// What a new volume can still get: a thin one also the room its
    /// pool has left.
    pub fn free_for(&self, thin: bool) -> u64 {
        let free = self.free_bytes();
        if !thin || self.degraded || self.silent.is_some() {
            return free;
        }
        free.saturating_add(self.thin_free_bytes)
    }

    fn extent(&self) -> u64 {
        if self.extent_bytes == 0 {
            DEFAULT_EXTENT_BYTES
        } else {
            self.extent_bytes
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no node has a {0} volume group")]
    NoNode(MediaClass),
    #[error("node {node} has no {media} volume group")]
    NoVolumeGroup { node: String, media: MediaClass },
    #[error("the {media} volume group of node {node} is degraded (a disk is missing)")]
    Degraded { node: String, media: MediaClass },
    #[error("node {node} cannot take new volumes: {reason}")]
    Silent { node: String, reason: String },
    #[error("node {node} has {free} bytes of {media} free; the volume needs {needed}")]
    Insufficient {
        node: String,
        media: MediaClass,
        free: u64,
        needed: u64,
    },
    #[error("no size in {range} is a whole number of {extent}-byte extents")]
    NoFittingSize { range: SizeRange, extent: u64 },
    #[error("volume is {current} bytes; it cannot shrink into {range}")]
    Shrink { current: u64, range: SizeRange },
    #[error(
        "node {node} has {free} bytes of {media} free; growing the volume needs {needed} more. \
         Ask for less (down to the volume's size) to give the expansion up"
    )]
    CannotGrow {
        node: String,
        media: MediaClass,
        free: u64,
        needed: u64,
    },
}

impl PlacementError {
    pub fn code(&self) -> Code {
        match self {
            // Final for Kubernetes' resizer, which then lets the claim's
            // request come back down.
            PlacementError::NoFittingSize { .. }
            | PlacementError::Shrink { .. }
            | PlacementError::CannotGrow { .. } => Code::OutOfRange,
            _ => Code::ResourceExhausted,
        }
    }
}

/// The node the CO asks for: its first preferred segment, else its first
/// requisite one. With WaitForFirstConsumer that is the node kube-scheduler
/// chose for the pod, so there is no falling back to another node: the
/// provisioner reschedules the pod when this one cannot take the volume.
pub fn asked_node(nodes: &NodeChoice) -> Option<&str> {
    nodes
        .preferred
        .first()
        .or(nodes.requisite.first())
        .map(String::as_str)
}

/// Whether a volume on `node` satisfies the topology requirement.
pub fn accessible(nodes: &NodeChoice, node: &str) -> bool {
    (nodes.preferred.is_empty() && nodes.requisite.is_empty())
        || nodes
            .preferred
            .iter()
            .chain(&nodes.requisite)
            .any(|n| n == node)
}

/// The volume group a new volume goes to: the asked node's, or with no
/// topology at all, the one with the most free space (ties: first by name,
/// so the answer does not depend on the order the store lists them in).
pub fn choose<'a>(
    nodes: &NodeChoice,
    media: MediaClass,
    candidates: &'a [NodeCapacity],
) -> Result<&'a NodeCapacity, PlacementError> {
    match asked_node(nodes) {
        Some(node) => candidates.iter().find(|c| c.node == node).ok_or_else(|| {
            PlacementError::NoVolumeGroup {
                node: node.to_owned(),
                media,
            }
        }),
        None => most_free(candidates).ok_or(PlacementError::NoNode(media)),
    }
}

/// The group with the most free space; what a volume can get at most.
pub fn most_free(candidates: &[NodeCapacity]) -> Option<&NodeCapacity> {
    candidates.iter().max_by(|a, b| {
        a.free_bytes()
            .cmp(&b.free_bytes())
            .then(b.node.cmp(&a.node))
    })
}

/// The size to create: the required size (or `default` when the CO sets
/// none, capped by the limit) rounded up to whole extents. With no
/// minimum, a limit that is not extent-aligned rounds down instead.
pub fn size_for(
    range: SizeRange,
    default: u64,
    capacity: &NodeCapacity,
) -> Result<u64, PlacementError> {
    let extent = capacity.extent();
    let wanted = if range.required > 0 {
        range.required
    } else {
        range.limit.map_or(default, |limit| default.min(limit))
    };
    let no_fit = || PlacementError::NoFittingSize { range, extent };
    let rounded = extent::checked_round_up(wanted, extent).ok_or_else(no_fit)?;
    match range.limit {
        Some(limit) if rounded > limit => {
            let down = limit / extent * extent;
            if range.required == 0 && down > 0 {
                Ok(down)
            } else {
                Err(no_fit())
            }
        }
        _ => Ok(rounded),
    }
}

/// The size after an expansion: unchanged when `current` already satisfies
/// the range (a repeated call), never smaller.
pub fn expanded_size(
    current: u64,
    range: SizeRange,
    capacity: &NodeCapacity,
) -> Result<u64, PlacementError> {
    if range.limit.is_some_and(|limit| limit < current) {
        return Err(PlacementError::Shrink { current, range });
    }
    if current >= range.required {
        return Ok(current);
    }
    size_for(range, current, capacity)
}

/// Checks that `needed` more bytes fit in the group.
pub fn check_fits(
    capacity: &NodeCapacity,
    media: MediaClass,
    needed: u64,
    thin: bool,
) -> Result<(), PlacementError> {
    if let Some(reason) = &capacity.silent {
        return Err(PlacementError::Silent {
            node: capacity.node.clone(),
            reason: reason.clone(),
        });
    }
    if capacity.degraded {
        return Err(PlacementError::Degraded {
            node: capacity.node.clone(),
            media,
        });
    }
    let free = capacity.free_for(thin);
    if needed > free {
        return Err(PlacementError::Insufficient {
            node: capacity.node.clone(),
            media,
            free,
            needed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn group(node: &str, total: u64, allocated: u64) -> NodeCapacity {
        NodeCapacity {
            node: node.into(),
            total_bytes: total,
            reported_free_bytes: total - allocated,
            allocated_bytes: allocated,
            unaccounted_bytes: 0,
            thin_free_bytes: 0,
            extent_bytes: 4 * MIB,
            degraded: false,
            silent: None,
        }
    }

    fn choice(preferred: &[&str], requisite: &[&str]) -> NodeChoice {
        NodeChoice {
            preferred: preferred.iter().map(|s| s.to_string()).collect(),
            requisite: requisite.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn range(required: u64, limit: Option<u64>) -> SizeRange {
        SizeRange { required, limit }
    }

    #[test]
    fn free_space_counts_placed_volumes_and_caps_at_lvm_figure() {
        let cases = [
            // (total, reported free, allocated, degraded, want)
            (100, 100, 0, false, 100),
            (100, 100, 30, false, 70), // placed, not yet made by the node
            (100, 70, 30, false, 70),  // made and reported: not counted twice
            (100, 50, 30, false, 50),  // an orphan LV holds 20
            (100, 100, 130, false, 0), // over-committed: no underflow
            (100, 100, 0, true, 0),
        ];
        // LVs the cluster does not know of count before LVM reports them.
        let mut unknown = group("n", 100, 30);
        unknown.unaccounted_bytes = 50;
        assert_eq!(unknown.free_bytes(), 20);
        for (total, reported, allocated, degraded, want) in cases {
            let capacity = NodeCapacity {
                node: "n".into(),
                total_bytes: total,
                reported_free_bytes: reported,
                allocated_bytes: allocated,
                unaccounted_bytes: 0,
                thin_free_bytes: 0,
                extent_bytes: 1,
                degraded,
                silent: None,
            };
            assert_eq!(capacity.free_bytes(), want, "{capacity:?}");
        }
    }

    #[test]
    fn asked_node_prefers_preferred_then_requisite() {
        let cases = [
            (choice(&[], &[]), None),
            (choice(&["a", "b"], &["c"]), Some("a")),
            (choice(&[], &["c", "d"]), Some("c")),
            (choice(&["b"], &[]), Some("b")),
        ];
        for (nodes, want) in cases {
            assert_eq!(asked_node(&nodes), want, "{nodes:?}");
        }
    }

    #[test]
    fn accessible_honours_every_listed_segment() {
        assert!(accessible(&choice(&[], &[]), "x"));
        assert!(accessible(&choice(&["a"], &["b"]), "b"));
        assert!(accessible(&choice(&["a"], &[]), "a"));
        assert!(!accessible(&choice(&["a"], &["b"]), "c"));
    }

    #[test]
    fn choose_takes_the_asked_node_or_the_most_free() {
        let groups = [
            group("a", 10 * GIB, 8 * GIB),
            group("b", 10 * GIB, GIB),
            group("c", 10 * GIB, 5 * GIB),
        ];
        let media = MediaClass::Ssd;
        assert_eq!(choose(&choice(&[], &[]), media, &groups).unwrap().node, "b");
        assert_eq!(
            choose(&choice(&["a"], &["b"]), media, &groups)
                .unwrap()
                .node,
            "a"
        );
        assert_eq!(
            choose(&choice(&[], &["c"]), media, &groups).unwrap().node,
            "c"
        );
        let err = choose(&choice(&["z"], &[]), media, &groups).unwrap_err();
        assert_eq!(
            err,
            PlacementError::NoVolumeGroup {
                node: "z".into(),
                media
            }
        );
        assert_eq!(err.code(), Code::ResourceExhausted);
        let err = choose(&choice(&[], &[]), media, &[]).unwrap_err();
        assert_eq!(err, PlacementError::NoNode(media));
        assert_eq!(err.code(), Code::ResourceExhausted);
    }

    #[test]
    fn most_free_breaks_ties_by_name() {
        let groups = [group("b", GIB, 0), group("a", GIB, 0), group("c", GIB, 0)];
        assert_eq!(most_free(&groups).unwrap().node, "a");
        assert_eq!(most_free(&[]), None);
    }

    #[test]
    fn size_for_rounds_up_to_extents_within_the_limit() {
        let extent = 4 * MIB;
        let default = GIB;
        let cases = [
            // (required, limit, want)
            (0, None, Ok(GIB)),                  // unset: the default
            (0, Some(100 * MIB), Ok(100 * MIB)), // default capped by the limit
            (0, Some(10 * MIB), Ok(8 * MIB)),    // limit not aligned: round down
            (1, None, Ok(4 * MIB)),              // one byte is one extent
            (GIB, None, Ok(GIB)),                // aligned stays
            (GIB + 1, None, Ok(GIB + extent)),   // rounded up
            (GIB + 1, Some(GIB + extent), Ok(GIB + extent)),
            (GIB, Some(GIB), Ok(GIB)),         // exact, csi-sanity's case
            (5 * MIB, Some(6 * MIB), Err(())), // no extent multiple inside
            (0, Some(MIB), Err(())),           // smaller than one extent
            (u64::MAX, None, Err(())),         // overflows
        ];
        let capacity = group("n", 0, 0);
        for (required, limit, want) in cases {
            let got = size_for(range(required, limit), default, &capacity);
            match want {
                Ok(bytes) => assert_eq!(got, Ok(bytes), "{required} {limit:?}"),
                Err(()) => {
                    let err = got.unwrap_err();
                    assert_eq!(err.code(), Code::OutOfRange, "{required} {limit:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn size_for_uses_the_node_extent_or_lvm_default() {
        let mut capacity = group("n", 0, 0);
        capacity.extent_bytes = 32 * MIB;
        assert_eq!(size_for(range(MIB, None), GIB, &capacity), Ok(32 * MIB));
        capacity.extent_bytes = 0;
        assert_eq!(size_for(range(MIB, None), GIB, &capacity), Ok(4 * MIB));
    }

    #[test]
    fn expanded_size_grows_exactly_and_never_shrinks() {
        let capacity = group("n", 0, 0);
        let cases = [
            // (current, required, limit, want)
            (GIB, 2 * GIB, None, Ok(2 * GIB)),
            (GIB, 2 * GIB, Some(2 * GIB), Ok(2 * GIB)),
            (GIB, GIB + 1, None, Ok(GIB + 4 * MIB)),
            (2 * GIB, 2 * GIB, None, Ok(2 * GIB)), // repeated call
            (2 * GIB, GIB, None, Ok(2 * GIB)),     // already bigger
            (2 * GIB, GIB, Some(GIB), Err(Code::OutOfRange)),
            (GIB, GIB + 1, Some(GIB + 2), Err(Code::OutOfRange)),
        ];
        for (current, required, limit, want) in cases {
            let got = expanded_size(current, range(required, limit), &capacity);
            assert_eq!(
                got.map_err(|e| e.code()),
                want,
                "{current} {required} {limit:?}"
            );
        }
    }

    #[test]
    fn check_fits_says_why_not() {
        let media = MediaClass::Hdd;
        let capacity = group("n", 10 * GIB, 9 * GIB);
        assert_eq!(check_fits(&capacity, media, GIB, false), Ok(()));
        let err = check_fits(&capacity, media, GIB + 1, false).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(
            err.to_string(),
            format!(
                "node n has {GIB} bytes of hdd free; the volume needs {}",
                GIB + 1
            )
        );
        let degraded = NodeCapacity {
            degraded: true,
            silent: None,
            ..group("n", 10 * GIB, 0)
        };
        let err = check_fits(&degraded, media, 1, false).unwrap_err();
        assert!(matches!(err, PlacementError::Degraded { .. }), "{err}");
        let silent = NodeCapacity {
            silent: Some("the lvmlocal agent has no heartbeat".into()),
            ..group("n", 10 * GIB, 0)
        };
        assert_eq!(silent.free_bytes(), 0);
        let err = check_fits(&silent, media, 1, false).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(
            err.to_string(),
            "node n cannot take new volumes: the lvmlocal agent has no heartbeat"
        );
    }
}
