//! Whether a pod's volumes fit on a node: free space per media class against
//! what the pod asks for. Pure arithmetic over plain values; the inventory
//! decides what counts as used.

use std::fmt::{self, Write};
use std::ops::{Index, IndexMut};

use lvmlocal_proto::heartbeat::Silence;
use lvmlocal_proto::{MediaClass, extent};

use crate::needs::ClaimNeed;
use crate::quantity::Bytes;

/// One value for each media class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerMedia<T>(pub [T; 3]);

impl<T> PerMedia<T> {
    const fn slot(media: MediaClass) -> usize {
        match media {
            MediaClass::Nvme => 0,
            MediaClass::Ssd => 1,
            MediaClass::Hdd => 2,
        }
    }
}

impl<T> Index<MediaClass> for PerMedia<T> {
    type Output = T;
    fn index(&self, media: MediaClass) -> &T {
        &self.0[Self::slot(media)]
    }
}

impl<T> IndexMut<MediaClass> for PerMedia<T> {
    fn index_mut(&mut self, media: MediaClass) -> &mut T {
        &mut self.0[Self::slot(media)]
    }
}

/// The volume group of one media class on one node, as the extender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaCapacity<'a> {
    pub vg_name: &'a str,
    pub total_bytes: u64,
    /// Taken by volumes, volumes being provisioned and reservations.
    pub used_bytes: u64,
    /// LVM's allocation unit; a volume takes a whole number of them.
    pub extent_bytes: u64,
    /// A physical volume is missing; LVM refuses to allocate until it is back.
    pub degraded: bool,
    /// How busy the group's disks are, 0 to 100, as the agent reports it.
    pub load_percent: u32,
}

impl MediaCapacity<'_> {
    pub fn free_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.used_bytes)
    }

    /// What a volume of `bytes` takes once LVM rounds it up to whole extents.
    pub fn allocation(&self, bytes: u64) -> u64 {
        extent::round_up(bytes, self.extent_bytes)
    }
}

/// A node's volume groups; `None` where the node has no group of a class.
pub type NodeCapacity<'a> = PerMedia<Option<MediaCapacity<'a>>>;

/// Why a pod's volumes cannot go to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The node has no `NodeLocalStorage`: no agent runs there, or it has not
    /// reported yet.
    NoStorage,
    /// The node's agent has not renewed its heartbeat: it would not create
    /// the volume, and what it last reported may be out of date.
    AgentSilent(Silence),
    /// The node has no volume group of this class.
    NoVolumeGroup(MediaClass),
    /// The group of this class is missing a disk.
    Degraded { media: MediaClass, vg_name: String },
    /// A claim copies a volume or snapshot of another node.
    SourceElsewhere { claim: String, node: String },
    /// The group of this class has too little free space.
    Short {
        media: MediaClass,
        needed_bytes: u64,
        free_bytes: u64,
    },
}

impl Refusal {
    /// Whether freeing space (e.g. by preempting pods) could never help.
    pub fn is_unresolvable(&self) -> bool {
        matches!(
            self,
            Refusal::NoStorage
                | Refusal::AgentSilent(_)
                | Refusal::NoVolumeGroup(_)
                | Refusal::SourceElsewhere { .. }
        )
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::NoStorage => "no_node_storage",
            Refusal::AgentSilent(_) => "agent_silent",
            Refusal::NoVolumeGroup(_) => "no_volume_group",
            Refusal::Degraded { .. } => "degraded",
            Refusal::Short { .. } => "insufficient_space",
            Refusal::SourceElsewhere { .. } => "source_elsewhere",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoStorage => f.write_str("no lvmlocal storage on this node"),
            Refusal::AgentSilent(silence) => write!(f, "{silence}"),
            Refusal::NoVolumeGroup(media) => write!(f, "{media}: no volume group on this node"),
            Refusal::Degraded { media, vg_name } => {
                write!(f, "{media}: volume group {vg_name} is missing a disk")
            }
            Refusal::SourceElsewhere { claim, node } => write!(
                f,
                "claim {claim} copies a volume or snapshot of node {node}, where it must be made"
            ),
            Refusal::Short {
                media,
                needed_bytes,
                free_bytes,
            } => write!(
                f,
                "{media}: needs {}, {} free",
                Bytes(*needed_bytes),
                Bytes(*free_bytes)
            ),
        }
    }
}

/// All the reasons in one line, as kube-scheduler shows them per node.
pub fn explain(refusals: &[Refusal]) -> String {
    let mut line = String::with_capacity(40 * refusals.len());
    for (i, refusal) in refusals.iter().enumerate() {
        if i > 0 {
            line.push_str("; ");
        }
        write!(line, "{refusal}").expect("writing to a String cannot fail");
    }
    line
}

/// What a node that takes a pod's volumes offers them: what placement ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fit {
    /// Bytes left free per class once they are placed (zero for classes the
    /// pod does not use).
    pub left: PerMedia<u64>,
    /// How busy each class's disks are, 0 to 100 (zero for classes the pod
    /// does not use).
    pub load: PerMedia<u32>,
}

impl Fit {
    /// Room left on disks reported idle.
    pub fn idle(left: PerMedia<u64>) -> Self {
        Fit {
            left,
            load: PerMedia::default(),
        }
    }
}

/// The outcome of placing a pod's volumes on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// They fit.
    Fits(Fit),
    /// They do not; every reason, those about the whole node first, then
    /// the media classes in order.
    Refused(Vec<Refusal>),
}

impl Verdict {
    pub fn fits(&self) -> bool {
        matches!(self, Verdict::Fits(_))
    }

    /// Refused for a reason about the whole node, on top of any others.
    pub fn also_refused(self, refusal: Refusal) -> Verdict {
        let mut refusals = vec![refusal];
        if let Verdict::Refused(others) = self {
            refusals.extend(others);
        }
        Verdict::Refused(refusals)
    }
}

/// Whether `claims` fit on a node with `capacity` (`None`: the node has no
/// lvmlocal storage at all).
pub fn fit(claims: &[ClaimNeed], capacity: Option<&NodeCapacity<'_>>) -> Verdict {
    let Some(capacity) = capacity else {
        return Verdict::Refused(vec![Refusal::NoStorage]);
    };
    // One pass over the claims, then one check per class: this runs for
    // every candidate node of every call.
    let mut needed = PerMedia::<Option<u64>>::default();
    for claim in claims {
        let allocation =
            capacity[claim.media].map_or(claim.bytes, |group| group.allocation(claim.bytes));
        let sum = needed[claim.media].get_or_insert(0);
        *sum = sum.saturating_add(allocation);
    }
    let mut fit = Fit::default();
    let mut refusals = Vec::new();
    for media in MediaClass::ALL {
        let Some(needed_bytes) = needed[media] else {
            continue;
        };
        match capacity[media] {
            None => refusals.push(Refusal::NoVolumeGroup(media)),
            Some(group) if group.degraded => refusals.push(Refusal::Degraded {
                media,
                vg_name: group.vg_name.to_owned(),
            }),
            Some(group) => {
                let free_bytes = group.free_bytes();
                match free_bytes.checked_sub(needed_bytes) {
                    Some(rest) => {
                        fit.left[media] = rest;
                        fit.load[media] = group.load_percent;
                    }
                    None => refusals.push(Refusal::Short {
                        media,
                        needed_bytes,
                        free_bytes,
                    }),
                }
            }
        }
    }
    if refusals.is_empty() {
        Verdict::Fits(fit)
    } else {
        Verdict::Refused(refusals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::needs::ClaimKey;

    const GI: u64 = 1 << 30;
    const MI4: u64 = 4 << 20;

    fn claim(media: MediaClass, bytes: u64) -> ClaimNeed {
        ClaimNeed {
            key: ClaimKey::new("db", &format!("{media}-{bytes}")),
            media,
            bytes,
            placement: None,
            selected_node: None,
            origin_node: None,
        }
    }

    fn group(total: u64, used: u64) -> Option<MediaCapacity<'static>> {
        Some(MediaCapacity {
            vg_name: "lvmlocal-nvme",
            total_bytes: total,
            used_bytes: used,
            extent_bytes: MI4,
            degraded: false,
            load_percent: 0,
        })
    }

    #[test]
    fn table() {
        use MediaClass::*;
        let nvme_only = PerMedia([group(500 * GI, 380 * GI), None, None]);
        let both = PerMedia([group(500 * GI, 0), group(GI, GI), None]);
        let degraded = PerMedia([
            group(500 * GI, 0).map(|g| MediaCapacity {
                degraded: true,
                ..g
            }),
            None,
            None,
        ]);
        let over_used = PerMedia([None, group(GI, 2 * GI), None]);
        let busy = PerMedia([
            group(500 * GI, 0).map(|g| MediaCapacity {
                load_percent: 40,
                ..g
            }),
            group(GI, 0).map(|g| MediaCapacity {
                load_percent: 90,
                ..g
            }),
            None,
        ]);
        let cases: Vec<(&str, Vec<ClaimNeed>, Option<&NodeCapacity>, Verdict)> = vec![
            (
                "fits with room left",
                vec![claim(Nvme, 100 * GI)],
                Some(&nvme_only),
                Verdict::Fits(Fit::idle(PerMedia([20 * GI, 0, 0]))),
            ),
            (
                "the load of each class the pod uses comes along",
                vec![claim(Nvme, 100 * GI)],
                Some(&busy),
                Verdict::Fits(Fit {
                    left: PerMedia([400 * GI, 0, 0]),
                    load: PerMedia([40, 0, 0]),
                }),
            ),
            (
                "fits exactly",
                vec![claim(Nvme, 60 * GI), claim(Nvme, 60 * GI)],
                Some(&nvme_only),
                Verdict::Fits(Fit::idle(PerMedia([0, 0, 0]))),
            ),
            (
                "claims of a class add up",
                vec![claim(Nvme, 100 * GI), claim(Nvme, 100 * GI)],
                Some(&nvme_only),
                Verdict::Refused(vec![Refusal::Short {
                    media: Nvme,
                    needed_bytes: 200 * GI,
                    free_bytes: 120 * GI,
                }]),
            ),
            (
                "a size is rounded up to whole extents",
                vec![claim(Nvme, 120 * GI - MI4 + 1)],
                Some(&nvme_only),
                Verdict::Fits(Fit::idle(PerMedia([0, 0, 0]))),
            ),
            (
                "one byte over after rounding",
                vec![claim(Nvme, 120 * GI + 1)],
                Some(&nvme_only),
                Verdict::Refused(vec![Refusal::Short {
                    media: Nvme,
                    needed_bytes: 120 * GI + MI4,
                    free_bytes: 120 * GI,
                }]),
            ),
            (
                "a class the node lacks",
                vec![claim(Nvme, GI), claim(Hdd, GI)],
                Some(&nvme_only),
                Verdict::Refused(vec![Refusal::NoVolumeGroup(Hdd)]),
            ),
            (
                "every reason is given",
                vec![claim(Nvme, GI), claim(Ssd, GI), claim(Hdd, GI)],
                Some(&both),
                Verdict::Refused(vec![
                    Refusal::Short {
                        media: Ssd,
                        needed_bytes: GI,
                        free_bytes: 0,
                    },
                    Refusal::NoVolumeGroup(Hdd),
                ]),
            ),
            (
                "a degraded group takes nothing",
                vec![claim(Nvme, GI)],
                Some(&degraded),
                Verdict::Refused(vec![Refusal::Degraded {
                    media: Nvme,
                    vg_name: "lvmlocal-nvme".into(),
                }]),
            ),
            (
                "a node without storage",
                vec![claim(Ssd, GI)],
                None,
                Verdict::Refused(vec![Refusal::NoStorage]),
            ),
            (
                "over-used groups have nothing free",
                vec![claim(Ssd, 1)],
                Some(&over_used),
                Verdict::Refused(vec![Refusal::Short {
                    media: Ssd,
                    needed_bytes: MI4,
                    free_bytes: 0,
                }]),
            ),
        ];
        for (name, claims, capacity, expected) in cases {
            assert_eq!(fit(&claims, capacity), expected, "{name}");
        }
    }

    #[test]
    fn reasons_read_as_an_operator_expects() {
        let short = Refusal::Short {
            media: MediaClass::Nvme,
            needed_bytes: 200 * GI,
            free_bytes: 120 * GI,
        };
        assert_eq!(short.to_string(), "nvme: needs 200Gi, 120Gi free");
        assert!(!short.is_unresolvable());
        assert_eq!(
            Refusal::NoVolumeGroup(MediaClass::Hdd).to_string(),
            "hdd: no volume group on this node"
        );
        assert!(Refusal::NoVolumeGroup(MediaClass::Hdd).is_unresolvable());
        assert!(Refusal::NoStorage.is_unresolvable());
        let degraded = Refusal::Degraded {
            media: MediaClass::Ssd,
            vg_name: "lvmlocal-ssd".into(),
        };
        assert_eq!(
            degraded.to_string(),
            "ssd: volume group lvmlocal-ssd is missing a disk"
        );
        assert!(!degraded.is_unresolvable());
        assert_eq!(
            explain(&[degraded, Refusal::NoVolumeGroup(MediaClass::Hdd)]),
            "ssd: volume group lvmlocal-ssd is missing a disk; hdd: no volume group on this node"
        );
        assert_eq!(explain(&[short]), "nvme: needs 200Gi, 120Gi free");
    }

    #[test]
    fn a_silent_agent_refuses_the_whole_node_for_good() {
        let silent = Refusal::AgentSilent(Silence::For(std::time::Duration::from_secs(52)));
        assert_eq!(
            silent.to_string(),
            "the lvmlocal agent has not renewed its heartbeat for 52s"
        );
        assert!(silent.is_unresolvable());
        assert_eq!(silent.kind(), "agent_silent");
        let short = Refusal::Short {
            media: MediaClass::Nvme,
            needed_bytes: GI,
            free_bytes: 0,
        };
        assert_eq!(
            Verdict::Refused(vec![short.clone()]).also_refused(silent.clone()),
            Verdict::Refused(vec![silent.clone(), short])
        );
        assert_eq!(
            Verdict::Fits(Fit::default()).also_refused(silent.clone()),
            Verdict::Refused(vec![silent])
        );
    }
}
