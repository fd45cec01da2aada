//! How nodes that fit are ranked: `binpack` prefers the node left with the
//! least free space, `spread` the one left with the most, `balanced` the one
//! whose disks of the class are least busy.
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
//!    `10 · (r − lo) / (hi − lo)` under spread; 10 when `hi = lo`. Under
//!    balanced it scores `10 · (100 − load) / 100`, where `load` is the
//!    class's `loadPercent` the node's agent reports (0 when it reports
//!    none): an absolute figure, so nodes equally idle tie and
//!    kube-scheduler's own scores decide between them.
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

use crate::capacity::{Fit, PerMedia};

/// The pod's claims of one media class under one placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreGroup {
    pub media: MediaClass,
    pub placement: Placement,
    pub bytes: u64,
}

/// Scores for each candidate, in order. `fits[i]` is what node `i` offers
/// the pod, or `None` if the pod does not fit there.
pub fn scores(groups: &[ScoreGroup], fits: &[Option<Fit>]) -> Vec<i64> {
    let mut range = PerMedia([(u64::MAX, 0u64); 3]);
    for fit in fits.iter().flatten() {
        for media in MediaClass::ALL {
            let (lo, hi) = &mut range[media];
            *lo = (*lo).min(fit.left[media]);
            *hi = (*hi).max(fit.left[media]);
        }
    }
    // A claim of zero bytes still expresses a preference.
    let weight = |group: &ScoreGroup| group.bytes.max(1) as f64;
    let total_weight: f64 = groups.iter().map(weight).sum();

    fits.iter()
        .map(|fit| {
            let Some(fit) = fit else {
                return MIN_EXTENDER_PRIORITY;
            };
            if groups.is_empty() {
                return MIN_EXTENDER_PRIORITY;
            }
            let weighted: f64 = groups
                .iter()
                .map(|group| {
                    let (lo, hi) = range[group.media];
                    let r = fit.left[group.media];
                    let toward_full = || {
                        if hi == lo {
                            None
                        } else {
                            Some((hi - r) as f64 / (hi - lo) as f64)
                        }
                    };
                    let share = match group.placement {
                        Placement::Binpack => toward_full().unwrap_or(1.0),
                        Placement::Spread => toward_full().map_or(1.0, |t| 1.0 - t),
                        Placement::Balanced => {
                            1.0 - f64::from(fit.load[group.media].min(100)) / 100.0
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
            let fits: Vec<Option<Fit>> = left.into_iter().map(|l| l.map(Fit::idle)).collect();
            assert_eq!(scores(&groups, &fits), expected, "{name}");
        }
    }

    fn loaded(left: u64, nvme_load: u32, hdd_load: u32) -> Option<Fit> {
        Some(Fit {
            left: PerMedia([left, 0, left]),
            load: PerMedia([nvme_load, 0, hdd_load]),
        })
    }

    #[test]
    fn balanced_ranks_by_the_load_of_the_class() {
        let balanced = vec![group(Nvme, Placement::Balanced, GI)];
        // Free space plays no part; only the class's own load does.
        assert_eq!(
            scores(
                &balanced,
                &[
                    loaded(GI, 80, 0),
                    loaded(100 * GI, 0, 90),
                    None,
                    loaded(GI, 35, 0)
                ]
            ),
            vec![2, 10, 0, 7]
        );
        // Load is absolute: equally idle nodes tie, equally busy ones too.
        assert_eq!(
            scores(&balanced, &[loaded(GI, 0, 0), loaded(9 * GI, 0, 0)]),
            vec![10, 10]
        );
        assert_eq!(
            scores(&balanced, &[loaded(GI, 100, 0), loaded(9 * GI, 100, 0)]),
            vec![0, 0]
        );
        // Beside binpack of as many bytes on HDD: the averages.
        let both = vec![
            group(Nvme, Placement::Balanced, GI),
            group(Hdd, Placement::Binpack, GI),
        ];
        // node 0: nvme (100 − 60)/100 → 4, hdd least left → 10: 7; node 1: 10 and 0: 5
        assert_eq!(
            scores(&both, &[loaded(GI, 60, 0), loaded(2 * GI, 0, 0)]),
            vec![7, 5]
        );
    }
}
