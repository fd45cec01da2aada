//! Whether this node's blank disks may be claimed: turned into physical
//! volumes and volume groups. Claiming writes LVM metadata over a disk, so it
//! happens only where the operator said so, through the node label or the
//! configuration; elsewhere the disks are only reported. Disks already in
//! lvmlocal's volume groups keep being used either way.

use std::collections::BTreeMap;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use lvmlocal_proto::runtime::watch_backoff;
use tokio::sync::mpsc;

use crate::config::DiscoveryConfig;
use crate::discovery::{Disk, Verdict};

/// The node label that opts a node in (`true`) or out (`false`).
pub const CLAIM_LABEL: &str = "lvmlocal.io/claim-disks";
/// Set by kubeadm and most installers on control-plane nodes.
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";

/// What is known about the node's labels when deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeLabels {
    /// No Kubernetes API (standalone mode, `discover`, `apply`): only the
    /// configuration decides.
    Standalone,
    Read(BTreeMap<String, String>),
    /// The Node object could not be read: no evidence, so no claiming.
    Unreadable(String),
}

/// The decision for one rescan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claiming {
    Enabled,
    /// Why not, in words an operator acts on.
    Disabled(String),
}

fn not_enabled() -> String {
    format!(
        "claiming is not enabled on this node: label the node {CLAIM_LABEL}=true \
         or set claim_disks = true in the configuration"
    )
}

/// Config × label × control plane → claim or only report.
///
/// The label, where present, overrides `claim_disks` both ways; a
/// control-plane node is refused unless `claim_control_plane` is set.
pub fn decide(config: &DiscoveryConfig, labels: &NodeLabels) -> Claiming {
    let labels = match labels {
        NodeLabels::Standalone => {
            return if config.claim_disks {
                Claiming::Enabled
            } else {
                Claiming::Disabled(
                    "claiming is not enabled: set claim_disks = true in the configuration \
                     (or pass --claim-disks)"
                        .into(),
                )
            };
        }
        NodeLabels::Unreadable(error) => {
            return Claiming::Disabled(format!(
                "the node's labels cannot be read, so no disk is claimed: {error}"
            ));
        }
        NodeLabels::Read(labels) => labels,
    };
    let opted_in = match labels.get(CLAIM_LABEL).map(String::as_str) {
        Some("true") => true,
        Some("false") => {
            return Claiming::Disabled(format!(
                "claiming is disabled on this node by its label {CLAIM_LABEL}=false"
            ));
        }
        Some(other) => {
            return Claiming::Disabled(format!(
                "the node's label {CLAIM_LABEL}={other:?} is neither \"true\" nor \"false\""
            ));
        }
        None => config.claim_disks,
    };
    if !opted_in {
        return Claiming::Disabled(not_enabled());
    }
    if labels.contains_key(CONTROL_PLANE_LABEL) && !config.claim_control_plane {
        return Claiming::Disabled(format!(
            "this is a control-plane node ({CONTROL_PLANE_LABEL}): its disks are claimed \
             only with claim_control_plane = true in the configuration"
        ));
    }
    Claiming::Enabled
}

/// Where claiming is disabled, blank disks are reported with what they
/// would join and why they do not, and so the plan writes nothing to them.
pub fn withhold(disks: &mut [Disk], claiming: &Claiming, config: &DiscoveryConfig) {
    let Claiming::Disabled(why) = claiming else {
        return;
    };
    for disk in disks {
        if let (Verdict::Usable, Some(media)) = (&disk.verdict, disk.media) {
            disk.verdict = Verdict::NotClaimed {
                vg: config.vg_name(media),
                why: why.clone(),
            };
        }
    }
}

/// Reads the labels of the agent's own Node.
#[derive(Clone)]
pub struct NodeSource {
    /// Metadata only: the labels are all that is read.
    api: Api<PartialObjectMeta<Node>>,
    node: String,
}

impl NodeSource {
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            api: Api::all(client),
            node: node.to_owned(),
        }
    }

    pub async fn labels(&self) -> NodeLabels {
        match self.api.get(&self.node).await {
            Ok(meta) => NodeLabels::Read(meta.metadata.labels.unwrap_or_default()),
            Err(err) => {
                tracing::warn!(error = %err, node = %self.node, "cannot read the Node's labels");
                NodeLabels::Unreadable(format!("reading Node {}: {err}", self.node))
            }
        }
    }

    /// Sends on `trigger` whenever the labels that decide claiming change,
    /// so a label set later takes effect without waiting for the rescan
    /// interval. Runs until the task is dropped.
    pub async fn watch(self, trigger: mpsc::Sender<()>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.node));
        let mut seen: Option<(Option<String>, bool)> = None;
        let mut events = watcher(self.api, config).backoff(watch_backoff()).boxed();
        loop {
            match events.try_next().await {
                Ok(Some(watcher::Event::Apply(meta) | watcher::Event::InitApply(meta))) => {
                    let labels = meta.metadata.labels.unwrap_or_default();
                    let now = (
                        labels.get(CLAIM_LABEL).cloned(),
                        labels.contains_key(CONTROL_PLANE_LABEL),
                    );
                    if seen.as_ref().is_some_and(|seen| *seen != now) {
                        tracing::info!(label = ?now.0, "the node's claiming labels changed");
                        // A full channel already holds a pending rescan.
                        let _ = trigger.try_send(());
                    }
                    seen = Some(now);
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(err) => tracing::warn!(error = %err, "watching the Node's labels"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    use super::*;
    use crate::api_mock::answer;

    fn config(claim_disks: bool, claim_control_plane: bool) -> DiscoveryConfig {
        DiscoveryConfig {
            claim_disks,
            claim_control_plane,
            ..DiscoveryConfig::default()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> NodeLabels {
        NodeLabels::Read(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn enabled(config: &DiscoveryConfig, labels: &NodeLabels) -> bool {
        decide(config, labels) == Claiming::Enabled
    }

    #[test]
    fn the_shipped_default_claims_nothing() {
        let default = DiscoveryConfig::default();
        for node in [
            NodeLabels::Standalone,
            labels(&[]),
            labels(&[("kubernetes.io/os", "linux")]),
        ] {
            let Claiming::Disabled(why) = decide(&default, &node) else {
                panic!("claims by default on {node:?}");
            };
            assert!(why.contains("claim_disks = true"), "{why}");
        }
        let Claiming::Disabled(why) = decide(&default, &labels(&[])) else {
            unreachable!()
        };
        assert!(why.contains("lvmlocal.io/claim-disks=true"), "{why}");
    }

    #[test]
    fn config_by_label_by_control_plane() {
        let worker = labels(&[]);
        let worker_in = labels(&[(CLAIM_LABEL, "true")]);
        let worker_out = labels(&[(CLAIM_LABEL, "false")]);
        let worker_typo = labels(&[(CLAIM_LABEL, "yes")]);
        let control = labels(&[(CONTROL_PLANE_LABEL, "")]);
        let control_in = labels(&[(CONTROL_PLANE_LABEL, ""), (CLAIM_LABEL, "true")]);
        // (claim_disks, claim_control_plane, node, claims)
        let table = [
            (false, false, &worker, false),
            (false, false, &worker_in, true),
            (false, false, &worker_out, false),
            (false, false, &worker_typo, false),
            (false, false, &control, false),
            (false, false, &control_in, false),
            (true, false, &worker, true),
            (true, false, &worker_in, true),
            (true, false, &worker_out, false),
            (true, false, &worker_typo, false),
            (true, false, &control, false),
            (true, false, &control_in, false),
            (false, true, &worker, false),
            (false, true, &control, false),
            (false, true, &control_in, true),
            (true, true, &control, true),
            (true, true, &worker_out, false),
            (true, false, &NodeLabels::Standalone, true),
            (false, true, &NodeLabels::Standalone, false),
        ];
        for (claim_disks, claim_control_plane, node, want) in table {
            assert_eq!(
                enabled(&config(claim_disks, claim_control_plane), node),
                want,
                "claim_disks={claim_disks} claim_control_plane={claim_control_plane} {node:?}"
            );
        }
    }

    #[test]
    fn only_blank_disks_are_withheld_and_members_stay() {
        let disk = |name: &str, verdict: Verdict| Disk {
            name: name.into(),
            slot: Some(
                format!("pci-0000:00:0{}.0-nvme-1", name.len())
                    .as_str()
                    .into(),
            ),
            media: Some(lvmlocal_proto::MediaClass::Nvme),
            size_bytes: 1 << 30,
            serial: None,
            model: None,
            verdict,
        };
        let member = Verdict::Member {
            vg: "lvmlocal-nvme".into(),
        };
        let mounted = Verdict::Mounted;
        let config = DiscoveryConfig::default();
        let mut disks = vec![
            disk("nvme0n1", Verdict::Usable),
            disk("nvme1n1", member.clone()),
            disk("nvme2n1", mounted.clone()),
        ];
        withhold(&mut disks, &Claiming::Enabled, &config);
        assert_eq!(disks[0].verdict, Verdict::Usable);

        let why = decide(&config, &labels(&[]));
        withhold(&mut disks, &why, &config);
        assert_eq!(disks[0].verdict.name(), "not-claimed");
        let reason = disks[0].verdict.reason();
        assert!(
            reason.starts_with("blank, would join lvmlocal-nvme, but claiming is not enabled"),
            "{reason}"
        );
        assert_eq!(disks[1].verdict, member);
        assert_eq!(disks[2].verdict, mounted);
        let plan = crate::plan::plan(&disks, &crate::plan::LvmState::default(), &config);
        assert_eq!(plan.actions, []);
    }

    #[test]
    fn each_refusal_says_what_to_change() {
        let reason = |config: &DiscoveryConfig, node: &NodeLabels| match decide(config, node) {
            Claiming::Disabled(why) => why,
            Claiming::Enabled => panic!("enabled on {node:?}"),
        };
        let on = config(true, false);
        assert!(reason(&on, &labels(&[(CONTROL_PLANE_LABEL, "")])).contains("claim_control_plane"));
        assert!(reason(&on, &labels(&[(CLAIM_LABEL, "false")])).contains("=false"));
        assert!(reason(&on, &labels(&[(CLAIM_LABEL, "yes")])).contains("\"yes\""));
        let unreadable = NodeLabels::Unreadable("reading Node a: forbidden".into());
        assert!(reason(&on, &unreadable).contains("forbidden"));
    }

    /// The Node's metadata is read on every call, so a label set since the
    /// last one counts; an API error is no evidence and claims nothing.
    #[tokio::test]
    async fn labels_are_read_fresh_and_an_error_claims_nothing() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("Node read");
            assert_eq!(request.method(), http::Method::GET);
            assert_eq!(request.uri().path(), "/api/v1/nodes/node-a");
            assert!(
                request.headers()["accept"]
                    .to_str()
                    .unwrap()
                    .contains("as=PartialObjectMetadata"),
                "metadata only"
            );
            answer(
                send,
                &json!({
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadata",
                    "metadata": {"name": "node-a", "labels": {CLAIM_LABEL: "true"}},
                }),
            );
            let (_, send) = handle.next_request().await.expect("Node read again");
            send.send_response(
                Response::builder()
                    .status(403)
                    .body(Body::from(
                        serde_json::to_vec(&json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "nodes \"node-a\" is forbidden", "reason": "Forbidden",
                            "code": 403,
                        }))
                        .unwrap(),
                    ))
                    .unwrap(),
            );
        });
        let source = NodeSource::new(Client::new(service, "default"), "node-a");
        let config = DiscoveryConfig::default();
        assert_eq!(decide(&config, &source.labels().await), Claiming::Enabled);
        let labels = source.labels().await;
        assert!(matches!(&labels, NodeLabels::Unreadable(why) if why.contains("forbidden")));
        let claiming_everywhere = DiscoveryConfig {
            claim_disks: true,
            ..config
        };
        assert_ne!(decide(&claiming_everywhere, &labels), Claiming::Enabled);
        api_server.await.unwrap();
    }
}
