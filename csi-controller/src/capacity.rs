//! What each node can still take: its volume groups as it reports them,
//! charged with the `LogicalVolume`s placed on them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::placement::NodeCapacity;

/// The volume groups of `media` on existing nodes, each charged with the
/// `LogicalVolume`s placed on it (including those being made or removed),
/// and marked with why its agent counts as silent (`silence`), if it does.
pub fn capacities(
    media: MediaClass,
    storage: &[Arc<NodeLocalStorage>],
    volumes: &[Arc<LogicalVolume>],
    nodes: &HashSet<String>,
    silence: impl Fn(&str) -> Option<String>,
) -> Vec<NodeCapacity> {
    let mut allocated: HashMap<&str, u64> = HashMap::new();
    for lv in volumes.iter().filter(|lv| lv.spec.media == media) {
        *allocated.entry(lv.spec.node_name.as_str()).or_default() += lv.charged_bytes();
    }
    storage
        .iter()
        .filter(|nls| nls.metadata.deletion_timestamp.is_none())
        .filter(|nls| nodes.contains(&nls.spec.node_name))
        .filter_map(|nls| {
            let status = nls.status.as_ref()?;
            let group = status.media(media)?;
            let node = nls.spec.node_name.clone();
            Some(NodeCapacity {
                silent: silence(&node),
                allocated_bytes: allocated.get(node.as_str()).copied().unwrap_or(0),
                unaccounted_bytes: status.unaccounted(media),
                thin_free_bytes: status.thin_free(media),
                node,
                total_bytes: group.total_bytes,
                reported_free_bytes: group.free_bytes,
                extent_bytes: group.extent_bytes,
                degraded: group.degraded,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lvmlocal_proto::crd::{MediaStatus, NodeLocalStorageSpec, NodeLocalStorageStatus};
    use serde_json::json;

    /// A `LogicalVolume` of `node`, made by its agent at `actual` bytes if
    /// given.
    fn lv(name: &str, node: &str, size: u64, actual: Option<u64>) -> Arc<LogicalVolume> {
        let status = actual.map(|size| json!({"phase": "Ready", "sizeBytes": size}));
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "lvmlocal.io/v1alpha1",
                "kind": "LogicalVolume",
                "metadata": {"name": name},
                "spec": {"nodeName": node, "media": "nvme", "sizeBytes": size},
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn nls(node: &str, total: u64, free: u64) -> Arc<NodeLocalStorage> {
        let mut nls = NodeLocalStorage::new(
            node,
            NodeLocalStorageSpec {
                node_name: node.into(),
            },
        );
        let mut status = NodeLocalStorageStatus::default();
        *status.media_mut(MediaClass::Nvme) = Some(MediaStatus {
            vg_name: "lvmlocal-nvme".into(),
            total_bytes: total,
            free_bytes: free,
            allocated_bytes: total - free,
            extent_bytes: 4 << 20,
            free: String::new(),
            degraded: false,
            message: None,
        });
        nls.status = Some(status);
        Arc::new(nls)
    }

    #[test]
    fn capacities_charge_placed_volumes_on_existing_nodes() {
        let mut with_hand_made = (*nls("a", 100, 100)).clone();
        // An LV made by hand takes 8 that LVM has not reported yet.
        with_hand_made.status.as_mut().unwrap().unaccounted_bytes =
            Some(lvmlocal_proto::crd::MediaBytes {
                nvme: 8,
                ..Default::default()
            });
        let storage = [
            Arc::new(with_hand_made),
            nls("b", 100, 90),
            nls("gone", 100, 100),
        ];
        let volumes = [
            lv("v1", "a", 30, None),
            lv("v2", "a", 10, Some(12)),
            lv("v3", "b", 10, None),
        ];
        let nodes: HashSet<String> = ["a".to_owned(), "b".to_owned()].into();
        let quiet = |node: &str| (node == "b").then(|| "silent".to_owned());
        let mut got = capacities(MediaClass::Nvme, &storage, &volumes, &nodes, quiet);
        got.sort_by(|x, y| x.node.cmp(&y.node));
        let summary: Vec<(&str, u64, u64)> = got
            .iter()
            .map(|c| (c.node.as_str(), c.allocated_bytes, c.free_bytes()))
            .collect();
        assert_eq!(summary, [("a", 42, 50), ("b", 10, 0)]);
        assert_eq!(got[1].silent.as_deref(), Some("silent"));
        assert!(capacities(MediaClass::Hdd, &storage, &volumes, &nodes, quiet).is_empty());
    }
}
