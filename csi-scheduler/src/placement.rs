//! How nodes that fit are ranked: `binpack` prefers the node left with the
//! least free space, `spread` the one left with the most.
//!
//! The score of a node for a pod, 0 to 10:
//!
//! 1. The pod's claims are grouped by (media class, placement). A claim's
//!    placement is its StorageClass's `lvmlocal.io/placement`, else the
//!    extender's default.
//! 2. For each media class, `r` is the space the node has left in that class
//!    once all the pod's claims of the class are placed; `lo` and `hi` are the
//!    least and the most `r` among the candidate nodes that fit.
//! 3. A group scores `10 · (hi − r) / (hi − lo)` under binpack and
//!    `10 · (r − lo) / (hi − lo)` under spread; 10 when `hi = lo`.
//! 4. The node's score is the average of its group scores weighted by the
//!    bytes each group requests, rounded to the nearest integer. Nodes that do
//!    not fit score 0.
//!
//! Scoring against the candidates' own range makes the extender's preference
//! decisive whatever the clusters' disk sizes; an operator who wants it to
//! weigh less lowers the extender's `weight` in the scheduler configuration.

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::extender::{MAX_EXTENDER_PRIORITY, MIN_EXTENDER_PRIORITY};
use lvmlocal_proto::params::Placement;

use crate::capacity::PerMedia;

/// The pod's claims of one media class under one placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreGroup {
    pub media: MediaClass,
    pub placement: Placement,
    pub bytes: u64,
}

/// Scores for each candidate, in order. `left[i]` is what node `i` has left
/// per class after placing the pod, or `None` if the pod does not fit there.
pub fn scores(groups: &[ScoreGroup], left: &[Option<PerMedia<u64>>]) -> Vec<i64> {
    let mut range = PerMedia([(u64::MAX, 0u64); 3]);
    for left in left.iter().flatten() {
        for media in MediaClass::ALL {
            let (lo, hi) = &mut range[media];
            *lo = (*lo).min(left[media]);
            *hi = (*hi).max(left[media]);
        }
    }
    // A claim of zero bytes still expresses a preference.
    let weight = |group: &ScoreGroup| group.bytes.max(1) as f64;
    let total_weight: f64 = groups.iter().map(weight).sum();

    left.iter()
        .map(|left| {
            let Some(left) = left else {
                return MIN_EXTENDER_PRIORITY;
            };
            if groups.is_empty() {
                return MIN_EXTENDER_PRIORITY;
            }
            let weighted: f64 = groups
                .iter()
                .map(|group| {
                    let (lo, hi) = range[group.media];
                    let r = left[group.media];
                    let share = if hi == lo {
                        1.0
                    } else {
                        let toward_full = (hi - r) as f64 / (hi - lo) as f64;
                        match group.placement {
                            Placement::Binpack => toward_full,
                            Placement::Spread => 1.0 - toward_full,
                        }
                    };
                    weight(group) * share
                })
                .sum();
            let score = (MAX_EXTENDER_PRIORITY as f64 * weighted / total_weight).round() as i64;
            score.clamp(MIN_EXTENDER_PRIORITY, MAX_EXTENDER_PRIORITY)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use MediaClass::*;

    const GI: u64 = 1 << 30;

    fn nvme(left: u64) -> Option<PerMedia<u64>> {
        Some(PerMedia([left, 0, 0]))
    }

    fn group(media: MediaClass, placement: Placement, bytes: u64) -> ScoreGroup {
        ScoreGroup {
            media,
            placement,
            bytes,
        }
    }

    /// Name, the pod's groups, what each node has left, the scores.
    type Case = (
        &'static str,
        Vec<ScoreGroup>,
        Vec<Option<PerMedia<u64>>>,
        Vec<i64>,
    );

    #[test]
    fn table() {
        let cases: Vec<Case> = vec![
            (
                "binpack: least left scores 10, most left 0",
                vec![group(Nvme, Placement::Binpack, GI)],
                vec![nvme(10 * GI), nvme(100 * GI), nvme(55 * GI)],
                vec![10, 0, 5],
            ),
            (
                "spread is the mirror image",
                vec![group(Nvme, Placement::Spread, GI)],
                vec![nvme(10 * GI), nvme(100 * GI), nvme(55 * GI)],
                vec![0, 10, 5],
            ),
            (
                "nodes that do not fit score 0 and do not stretch the range",
                vec![group(Nvme, Placement::Spread, GI)],
                vec![None, nvme(20 * GI), nvme(40 * GI)],
                vec![0, 0, 10],
            ),
            (
                "equal nodes all score 10",
                vec![group(Nvme, Placement::Binpack, GI)],
                vec![nvme(7 * GI), nvme(7 * GI)],
                vec![10, 10],
            ),
            (
                "classes are weighted by the bytes requested",
                vec![
                    group(Nvme, Placement::Binpack, 300 * GI),
                    group(Hdd, Placement::Binpack, 100 * GI),
                ],
                vec![
                    Some(PerMedia([0, 0, 1000 * GI])),
                    Some(PerMedia([100 * GI, 0, 0])),
                ],
                // node 0: nvme 10 (·3), hdd 0 (·1) → 7.5 → 8; node 1: 0·3 + 10·1 → 2.5 → 3
                vec![8, 3],
            ),
            (
                "two placements on one class pull both ways",
                vec![
                    group(Ssd, Placement::Binpack, GI),
                    group(Ssd, Placement::Spread, GI),
                ],
                vec![Some(PerMedia([0, GI, 0])), Some(PerMedia([0, 3 * GI, 0]))],
                vec![5, 5],
            ),
            (
                "no candidates",
                vec![group(Nvme, Placement::Binpack, GI)],
                vec![],
                vec![],
            ),
            ("no groups", vec![], vec![nvme(GI)], vec![0]),
        ];
        for (name, groups, left, expected) in cases {
            assert_eq!(scores(&groups, &left), expected, "{name}");
        }
    }
}
