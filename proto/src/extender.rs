//! The kube-scheduler extender protocol, as `k8s.io/kube-scheduler/extender/v1`
//! puts it on the wire. The Go types carry no json tags, so every key is the Go
//! field name (`Pod`, `NodeNames`, ...) and a nil pointer, slice or map is
//! `null`: kube-scheduler fills either `Nodes` (nodeCacheCapable: false) or
//! `NodeNames` (nodeCacheCapable: true) and sends the other as `null`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::List;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::{Deserialize, Serialize};

/// Lowest score `prioritize` may give (`MinExtenderPriority`).
pub const MIN_EXTENDER_PRIORITY: i64 = 0;
/// Highest score `prioritize` may give (`MaxExtenderPriority`).
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// A node's name as a call carries it: borrowed from the request's body
/// where JSON needs no unescaping (always, for names a node can have), so
/// thousands of names a call cost no allocation each.
pub type NodeName<'a> = Cow<'a, str>;

/// Node name → why the pod cannot go there.
pub type FailedNodesMap<'a> = BTreeMap<NodeName<'a>, String>;

/// The body of a `filter` or `prioritize` call; its names borrow from the
/// text it is read from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderArgs<'a> {
    pub pod: Option<Pod>,
    /// Candidate nodes in full; sent when the extender is not node-cache capable.
    pub nodes: Option<List<Node>>,
    /// Candidate node names; sent when the extender is node-cache capable.
    #[serde(borrow, default, deserialize_with = "borrowed_names")]
    pub node_names: Option<Vec<NodeName<'a>>>,
}

/// serde borrows a `Cow<str>` only where it is a field of its own, not an
/// element of a list: each name goes through this wrapper.
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

fn borrowed_names<'de, D>(deserializer: D) -> Result<Option<Vec<NodeName<'de>>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let names = Option::<Vec<Borrowed<'de>>>::deserialize(deserializer)?;
    Ok(names.map(|names| names.into_iter().map(|name| name.0).collect()))
}

/// The answer to `filter`. kube-scheduler reads `NodeNames` when it is
/// node-cache capable and the answer has them, `Nodes` otherwise, and rejects
/// the whole answer if it names a node it did not send.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderFilterResult<'a> {
    pub nodes: Option<List<Node>>,
    pub node_names: Option<Vec<NodeName<'a>>>,
    /// Nodes that failed, which preempting pods might fix.
    pub failed_nodes: Option<FailedNodesMap<'a>>,
    /// Nodes that failed for a reason preemption cannot change; these take
    /// precedence over `FailedNodes`.
    pub failed_and_unresolvable_nodes: Option<FailedNodesMap<'a>>,
    /// Non-empty when the call failed as a whole; kube-scheduler then retries
    /// the pod later.
    #[serde(default)]
    pub error: String,
}

impl ExtenderFilterResult<'_> {
    /// The JSON the derived `Serialize` writes, byte for byte, written
    /// directly: an answer names thousands of nodes, and serde escapes each
    /// name, and each key, a byte at a time.
    pub fn to_json(&self) -> Vec<u8> {
        let names = self.node_names.as_ref().map_or(0, Vec::len);
        let failed = [&self.failed_nodes, &self.failed_and_unresolvable_nodes]
            .into_iter()
            .flatten()
            .flat_map(BTreeMap::iter)
            .map(|(name, why)| name.len() + why.len() + 6)
            .sum::<usize>();
        let mut out = Vec::with_capacity(128 + 24 * names + failed + self.error.len());
        out.extend_from_slice(b"{\"Nodes\":");
        match &self.nodes {
            None => out.extend_from_slice(b"null"),
            Some(nodes) => serde_json::to_writer(&mut out, nodes)
                .expect("a node list always serializes to JSON"),
        }
        out.extend_from_slice(b",\"NodeNames\":");
        match &self.node_names {
            None => out.extend_from_slice(b"null"),
            Some(names) => {
                out.push(b'[');
                for (i, name) in names.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(&mut out, name);
                }
                out.push(b']');
            }
        }
        for (key, map) in [
            (&b",\"FailedNodes\":"[..], &self.failed_nodes),
            (
                b",\"FailedAndUnresolvableNodes\":",
                &self.failed_and_unresolvable_nodes,
            ),
        ] {
            out.extend_from_slice(key);
            match map {
                None => out.extend_from_slice(b"null"),
                Some(map) => {
                    out.push(b'{');
                    for (i, (name, why)) in map.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        write_str(&mut out, name);
                        out.push(b':');
                        write_str(&mut out, why);
                    }
                    out.push(b'}');
                }
            }
        }
        out.extend_from_slice(b",\"Error\":");
        write_str(&mut out, &self.error);
        out.push(b'}');
        out
    }
}

/// `prioritize`'s answer as the derived `Serialize` writes it, written
/// directly (see [`ExtenderFilterResult::to_json`]).
pub fn priorities_json(list: &[HostPriority<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + list.len() * 40);
    out.push(b'[');
    let mut score = itoa::Buffer::new();
    for (i, priority) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"Host\":");
        write_str(&mut out, &priority.host);
        out.extend_from_slice(b",\"Score\":");
        out.extend_from_slice(score.format(priority.score).as_bytes());
        out.push(b'}');
    }
    out.push(b']');
    out
}

/// A JSON string: as it is where nothing in it needs escaping (node names
/// never do), else as serde_json escapes it.
fn write_str(out: &mut Vec<u8>, text: &str) {
    // Every byte is looked at, without an early exit, so the check runs
    // many bytes at a time.
    let plain = text.bytes().fold(true, |plain, byte| {
        plain & (0x20..0x7f).contains(&byte) & (byte != b'"') & (byte != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, text).expect("a string always serializes to JSON");
    }
}

/// One node's score from `prioritize`, between the two extender priorities.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HostPriority<'a> {
    pub host: NodeName<'a>,
    pub score: i64,
}

/// The answer to `prioritize`.
pub type HostPriorityList<'a> = Vec<HostPriority<'a>>;

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
        let text = body.to_string();
        let args: ExtenderArgs = serde_json::from_str(&text).unwrap();
        assert_eq!(args.pod.unwrap().metadata.uid.as_deref(), Some("8b0c"));
        assert!(args.nodes.is_none());
        let names = args.node_names.unwrap();
        assert_eq!(names, ["node-a", "node-b"]);
        assert!(
            names.iter().all(|name| matches!(name, Cow::Borrowed(_))),
            "{names:?}"
        );
        // An escaped name cannot be borrowed, and is read all the same.
        let escaped: ExtenderArgs =
            serde_json::from_str(r#"{"Pod": null, "Nodes": null, "NodeNames": ["node\u002da"]}"#)
                .unwrap();
        assert_eq!(escaped.node_names.unwrap(), ["node-a"]);
        // A field left out is as good as null.
        let without: ExtenderArgs =
            serde_json::from_str(r#"{"Pod": null, "Nodes": null}"#).unwrap();
        assert_eq!(without.node_names, None);
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
        let text = body.to_string();
        let args: ExtenderArgs = serde_json::from_str(&text).unwrap();
        let nodes = args.nodes.unwrap();
        assert_eq!(nodes.items[0].metadata.name.as_deref(), Some("node-a"));
        assert!(args.node_names.is_none());

        let empty =
            json!({"Pod": null, "Nodes": {"metadata": {}, "items": null}, "NodeNames": null});
        let text = empty.to_string();
        let args: ExtenderArgs = serde_json::from_str(&text).unwrap();
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
    fn direct_json_is_what_serde_writes() {
        let odd = "n\u{e9}\"\\\n\u{7f}\u{1}<>&";
        let failed = |names: &[&'static str]| {
            Some(FailedNodesMap::from_iter(names.iter().map(|name| {
                (
                    NodeName::from(*name),
                    format!("nvme: needs 2Gi, 1Gi free ({name})"),
                )
            })))
        };
        let results = [
            ExtenderFilterResult::default(),
            ExtenderFilterResult {
                node_names: Some(vec!["node-a".into(), odd.into(), "".into()]),
                failed_nodes: failed(&["node-b", odd]),
                failed_and_unresolvable_nodes: Some(FailedNodesMap::new()),
                error: String::new(),
                ..ExtenderFilterResult::default()
            },
            ExtenderFilterResult {
                nodes: Some(
                    serde_json::from_value(json!({"metadata": {}, "items": [
                        {"metadata": {"name": "node-a", "labels": {"a": "b"}}}
                    ]}))
                    .unwrap(),
                ),
                failed_and_unresolvable_nodes: failed(&["node-c"]),
                error: format!("cannot judge {odd}"),
                ..ExtenderFilterResult::default()
            },
        ];
        for result in results {
            assert_eq!(
                String::from_utf8(result.to_json()).unwrap(),
                serde_json::to_string(&result).unwrap()
            );
        }
        let priorities: HostPriorityList = vec![
            HostPriority {
                host: "node-a".into(),
                score: 10,
            },
            HostPriority {
                host: odd.into(),
                score: 0,
            },
            HostPriority {
                host: "".into(),
                score: -3,
            },
        ];
        for list in [&priorities[..], &[]] {
            assert_eq!(
                String::from_utf8(priorities_json(list)).unwrap(),
                serde_json::to_string(list).unwrap()
            );
        }
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
