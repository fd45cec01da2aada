//! The kube-scheduler extender protocol, as `k8s.io/kube-scheduler/extender/v1`
//! puts it on the wire. The Go types carry no json tags, so every key is the Go
//! field name (`Pod`, `NodeNames`, ...) and a nil pointer, slice or map is
//! `null`: kube-scheduler fills either `Nodes` (nodeCacheCapable: false) or
//! `NodeNames` (nodeCacheCapable: true) and sends the other as `null`.

use std::collections::BTreeMap;

use k8s_openapi::List;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::{Deserialize, Serialize};

/// Lowest score `prioritize` may give (`MinExtenderPriority`).
pub const MIN_EXTENDER_PRIORITY: i64 = 0;
/// Highest score `prioritize` may give (`MaxExtenderPriority`).
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// Node name → why the pod cannot go there.
pub type FailedNodesMap = BTreeMap<String, String>;

/// The body of a `filter` or `prioritize` call.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderArgs {
    pub pod: Option<Pod>,
    /// Candidate nodes in full; sent when the extender is not node-cache capable.
    pub nodes: Option<List<Node>>,
    /// Candidate node names; sent when the extender is node-cache capable.
    pub node_names: Option<Vec<String>>,
}

/// The answer to `filter`. kube-scheduler reads `NodeNames` when it is
/// node-cache capable and the answer has them, `Nodes` otherwise, and rejects
/// the whole answer if it names a node it did not send.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderFilterResult {
    pub nodes: Option<List<Node>>,
    pub node_names: Option<Vec<String>>,
    /// Nodes that failed, which preempting pods might fix.
    pub failed_nodes: Option<FailedNodesMap>,
    /// Nodes that failed for a reason preemption cannot change; these take
    /// precedence over `FailedNodes`.
    pub failed_and_unresolvable_nodes: Option<FailedNodesMap>,
    /// Non-empty when the call failed as a whole; kube-scheduler then retries
    /// the pod later.
    #[serde(default)]
    pub error: String,
}

/// One node's score from `prioritize`, between the two extender priorities.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HostPriority {
    pub host: String,
    pub score: i64,
}

/// The answer to `prioritize`.
pub type HostPriorityList = Vec<HostPriority>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // What Go's encoding/json makes of an ExtenderArgs built by
    // HTTPExtender.Filter with nodeCacheCapable: true.
    #[test]
    fn args_with_names_decode_as_kube_scheduler_sends_them() {
        let body = json!({
            "Pod": {
                "metadata": {"name": "db-0", "namespace": "db", "uid": "8b0c", "creationTimestamp": null},
                "spec": {"containers": [{"name": "db", "image": "postgres", "resources": {}}]},
                "status": {}
            },
            "Nodes": null,
            "NodeNames": ["node-a", "node-b"]
        });
        let args: ExtenderArgs = serde_json::from_value(body).unwrap();
        assert_eq!(args.pod.unwrap().metadata.uid.as_deref(), Some("8b0c"));
        assert!(args.nodes.is_none());
        assert_eq!(args.node_names.unwrap(), ["node-a", "node-b"]);
    }

    // nodeCacheCapable: false sends a v1.NodeList without kind or apiVersion,
    // and a nil Items slice as null.
    #[test]
    fn args_with_a_node_list_decode_without_type_meta() {
        let body = json!({
            "Pod": {"metadata": {"name": "p"}, "spec": {"containers": []}},
            "Nodes": {"metadata": {}, "items": [{"metadata": {"name": "node-a"}, "spec": {}, "status": {}}]},
            "NodeNames": null
        });
        let args: ExtenderArgs = serde_json::from_value(body).unwrap();
        let nodes = args.nodes.unwrap();
        assert_eq!(nodes.items[0].metadata.name.as_deref(), Some("node-a"));
        assert!(args.node_names.is_none());

        let empty =
            json!({"Pod": null, "Nodes": {"metadata": {}, "items": null}, "NodeNames": null});
        let args: ExtenderArgs = serde_json::from_value(empty).unwrap();
        assert!(args.nodes.unwrap().items.is_empty());
    }

    #[test]
    fn filter_result_uses_go_field_names_and_null_for_nil() {
        let result = ExtenderFilterResult {
            node_names: Some(vec!["node-a".into()]),
            failed_nodes: Some(FailedNodesMap::from([(
                "node-b".into(),
                "nvme: needs 200Gi, 120Gi free".into(),
            )])),
            failed_and_unresolvable_nodes: Some(FailedNodesMap::new()),
            ..ExtenderFilterResult::default()
        };
        assert_eq!(
            serde_json::to_value(&result).unwrap(),
            json!({
                "Nodes": null,
                "NodeNames": ["node-a"],
                "FailedNodes": {"node-b": "nvme: needs 200Gi, 120Gi free"},
                "FailedAndUnresolvableNodes": {},
                "Error": ""
            })
        );
    }

    #[test]
    fn host_priority_round_trips() {
        let list: HostPriorityList = vec![HostPriority {
            host: "node-a".into(),
            score: MAX_EXTENDER_PRIORITY,
        }];
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json, json!([{"Host": "node-a", "Score": 10}]));
        assert_eq!(
            serde_json::from_value::<HostPriorityList>(json).unwrap(),
            list
        );
    }
}
