//! Properties of filtering and scoring over generated nodes and pods.

use std::collections::BTreeSet;

use csi_scheduler::capacity::{Fit, MediaCapacity, NodeCapacity, PerMedia, Verdict, fit};
use csi_scheduler::needs::{ClaimKey, ClaimNeed};
use csi_scheduler::placement::{ScoreGroup, scores};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::extender::ExtenderArgs;
use lvmlocal_proto::params::Placement;
use proptest::prelude::*;

use crate::support::*;

fn media() -> impl Strategy<Value = MediaClass> {
    prop::sample::select(MediaClass::ALL.to_vec())
}

fn placement() -> impl Strategy<Value = Placement> {
    prop::sample::select(vec![
        Placement::Binpack,
        Placement::Spread,
        Placement::Balanced,
    ])
}

/// (total, used, extent, degraded) of a group, or no group.
type Group = Option<(u64, u64, u64, bool)>;

fn group() -> impl Strategy<Value = Group> {
    prop::option::weighted(
        0.8,
        (
            0..1u64 << 42,
            0..1u64 << 42,
            prop::sample::select(vec![0u64, 1, 512, EXTENT]),
            prop::bool::weighted(0.1),
        ),
    )
}

fn claims() -> impl Strategy<Value = Vec<(MediaClass, u64)>> {
    prop::collection::vec((media(), 0..1u64 << 40), 0..6)
}

fn capacity(groups: &[Group; 3]) -> NodeCapacity<'static> {
    PerMedia(groups.map(|group| {
        group.map(|(total, used, extent, degraded)| MediaCapacity {
            vg_name: "vg",
            total_bytes: total,
            used_bytes: used,
            extent_bytes: extent,
            degraded,
            load_percent: 0,
        })
    }))
}

fn needs(claims: &[(MediaClass, u64)]) -> Vec<ClaimNeed> {
    claims
        .iter()
        .enumerate()
        .map(|(i, (media, bytes))| ClaimNeed {
            key: ClaimKey::new("ns", &i.to_string()),
            media: *media,
            bytes: *bytes,
            placement: None,
            selected_node: None,
            origin_node: None,
        })
        .collect()
}

proptest! {
    /// A node fits exactly when every class the pod uses has a healthy group
    /// with room for its claims rounded up to whole extents; then what is
    /// left is what the arithmetic says.
    #[test]
    fn a_node_that_fits_is_never_filtered(groups in [group(), group(), group()], claims in claims()) {
        let mut expected = PerMedia::<Option<u64>>::default();
        let mut fits = true;
        for media in MediaClass::ALL {
            let of_class: Vec<u64> = claims.iter().filter(|(m, _)| *m == media).map(|(_, b)| *b).collect();
            if of_class.is_empty() {
                expected[media] = Some(0);
                continue;
            }
            let Some((total, used, extent, degraded)) = groups[MediaClass::ALL.iter().position(|m| *m == media).unwrap()] else {
                fits = false;
                continue;
            };
            let need: u64 = of_class
                .iter()
                .map(|bytes| if extent == 0 { *bytes } else { bytes.div_ceil(extent) * extent })
                .sum();
            let free = total.saturating_sub(used);
            if degraded || need > free {
                fits = false;
            } else {
                expected[media] = Some(free - need);
            }
        }
        let verdict = fit(&needs(&claims), Some(&capacity(&groups)));
        prop_assert_eq!(verdict.fits(), fits, "{:?}", verdict);
        if let Verdict::Fits(fit) = verdict {
            for media in MediaClass::ALL {
                prop_assert_eq!(Some(fit.left[media]), expected[media]);
            }
        }
    }

    /// Under binpack a node with less left never scores below one with more;
    /// under spread never above; under balanced a less loaded node never
    /// scores below a busier one. Scores stay within 0–10, nodes that do not
    /// fit score 0.
    #[test]
    fn scores_rank_by_what_is_left_or_load(
        placement in placement(),
        media in media(),
        nodes in prop::collection::vec(
            prop::option::weighted(0.8, (0..1u64 << 44, 0..=100u32)),
            0..30,
        ),
    ) {
        let fits: Vec<Option<Fit>> = nodes
            .iter()
            .map(|node| node.map(|(bytes, load)| {
                let mut fit = Fit::default();
                fit.left[media] = bytes;
                fit.load[media] = load;
                fit
            }))
            .collect();
        let groups = [ScoreGroup { media, placement, bytes: 1 << 30 }];
        let scores = scores(&groups, &fits);
        prop_assert_eq!(scores.len(), fits.len());
        for (i, score) in scores.iter().enumerate() {
            prop_assert!((0..=10).contains(score));
            if fits[i].is_none() {
                prop_assert_eq!(*score, 0);
            }
            for (j, other) in scores.iter().enumerate() {
                let (Some(a), Some(b)) = (fits[i], fits[j]) else { continue };
                match placement {
                    Placement::Binpack if a.left[media] < b.left[media] => {
                        prop_assert!(score >= other)
                    }
                    Placement::Spread if a.left[media] < b.left[media] => {
                        prop_assert!(score <= other)
                    }
                    Placement::Balanced if a.load[media] < b.load[media] => {
                        prop_assert!(score >= other)
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn scores_of_several_classes_stay_in_range(
        groups in prop::collection::vec((media(), placement(), 0..1u64 << 42), 0..5),
        left in prop::collection::vec(prop::option::of([0..1u64 << 44, 0..1u64 << 44, 0..1u64 << 44]), 0..20),
        load in [0..=100u32, 0..=100u32, 0..=100u32],
    ) {
        let groups: Vec<ScoreGroup> = groups
            .into_iter()
            .map(|(media, placement, bytes)| ScoreGroup { media, placement, bytes })
            .collect();
        let fits: Vec<Option<Fit>> = left
            .into_iter()
            .map(|left| left.map(|left| Fit { left: PerMedia(left), load: PerMedia(load) }))
            .collect();
        for score in scores(&groups, &fits) {
            prop_assert!((0..=10).contains(&score));
        }
    }

    /// Through the whole extender: every node sent is answered exactly once,
    /// as passing, failed or unresolvable; no other name comes back; a node
    /// with room for the pod passes; prioritize scores each node sent, in
    /// order, within 0–10.
    #[test]
    fn the_extender_answers_for_exactly_the_nodes_sent(
        nodes in prop::collection::vec(
            (prop::option::weighted(0.9, (0..2000u64, 0..2000u64)), prop::option::weighted(0.7, (0..8000u64, 0..8000u64))),
            1..25,
        ),
        claims in prop::collection::vec((prop::bool::ANY, 0..400u64), 1..4),
        sent in prop::collection::btree_set(0..30usize, 0..30),
    ) {
        use MediaClass::{Hdd, Nvme};
        let mut cluster = Cluster { classes: classes(), ..Cluster::default() };
        for (i, (nvme, hdd)) in nodes.iter().enumerate() {
            let node = format!("node-{i}");
            let mut groups = Vec::new();
            for (media, group) in [(Nvme, nvme), (Hdd, hdd)] {
                if let Some((total, used)) = group {
                    groups.push((media, total * GI));
                    cluster.volumes.push(volume(&format!("{node}-{media}"), &node, media, used * GI, None));
                }
            }
            cluster.storages.push(storage(&node, &groups));
        }
        let mut names = Vec::new();
        let mut need = PerMedia::<Option<u64>>::default();
        for (i, (on_hdd, size)) in claims.iter().enumerate() {
            let media = if *on_hdd { Hdd } else { Nvme };
            *need[media].get_or_insert(0) += size * GI;
            let name = format!("claim-{i}");
            cluster.claims.push(claim("ns", &name, media.as_str(), size * GI));
            names.push(name);
        }
        let extender = extender(policy());
        apply_all(&mut extender.inventory(), &cluster);
        let claim_names: Vec<&str> = names.iter().map(String::as_str).collect();
        let pod = pod("ns", "p", "uid-p", &claim_names);
        let sent: Vec<String> = sent.into_iter().map(|i| format!("node-{i}")).collect();
        let args = ExtenderArgs {
            pod: Some(pod),
            nodes: None,
            node_names: Some(sent.iter().map(|name| name.as_str().into()).collect()),
        };

        let result = extender.filter(args.clone());
        prop_assert_eq!(&result.error, "");
        let passed = result.node_names.clone().unwrap();
        let failed = result.failed_nodes.clone().unwrap();
        let unresolvable = result.failed_and_unresolvable_nodes.clone().unwrap();
        let mut answered: Vec<&str> = passed.iter().chain(failed.keys()).chain(unresolvable.keys()).map(|name| &**name).collect();
        answered.sort();
        let mut expected: Vec<&str> = sent.iter().map(String::as_str).collect();
        expected.sort();
        prop_assert_eq!(answered, expected, "each node sent is answered once");
        let sent_set: BTreeSet<&str> = sent.iter().map(String::as_str).collect();
        for name in &passed {
            prop_assert!(sent_set.contains(&**name));
        }
        for name in &sent {
            let Some(i) = name.strip_prefix("node-").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < nodes.len()) else {
                prop_assert!(unresolvable.contains_key(name.as_str()));
                continue;
            };
            let room = |group: Option<(u64, u64)>, need: Option<u64>| match (group, need) {
                (_, None) => true,
                (None, Some(_)) => false,
                (Some((total, used)), Some(need)) => total.saturating_sub(used) * GI >= need,
            };
            let fits = room(nodes[i].0, need[Nvme]) && room(nodes[i].1, need[Hdd]);
            let name = name.as_str();
            prop_assert_eq!(passed.iter().any(|passed| passed == name), fits, "{}: {:?} {:?}", name, failed.get(name), unresolvable.get(name));
        }

        let priorities = extender.prioritize(args).unwrap();
        let hosts: Vec<&str> = priorities.iter().map(|p| &*p.host).collect();
        prop_assert_eq!(hosts, sent.iter().map(String::as_str).collect::<Vec<_>>());
        for priority in &priorities {
            prop_assert!((0..=10).contains(&priority.score));
        }
    }
}
