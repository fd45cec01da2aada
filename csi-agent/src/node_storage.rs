//! The node's `NodeLocalStorage`: what the inventory says, in the shape the
//! cluster reads, written only when it changed; and Kubernetes events when a
//! disk joins, is refused or vanishes.

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use lvmlocal_proto::crd::{DiskStatus, MediaStatus, NodeLocalStorage, NodeLocalStorageStatus};

use crate::discovery::{Disk, Verdict};
use crate::inventory::Inventory;
use lvmlocal_proto::extent::human_bytes;

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "lvmlocal-agent";

/// The status the inventory amounts to. Only classes whose volume group
/// exists appear: a node without one has none of that class to offer.
pub fn status(inventory: &Inventory) -> NodeLocalStorageStatus {
    let mut status = NodeLocalStorageStatus::default();
    for group in &inventory.plan.groups {
        let Some(vg) = inventory.lvm.vg(&group.vg) else {
            continue;
        };
        *status.media_mut(group.media) = Some(MediaStatus {
            vg_name: vg.name.clone(),
            total_bytes: vg.size_bytes,
            free_bytes: vg.free_bytes,
            allocated_bytes: vg.size_bytes - vg.free_bytes,
            extent_bytes: vg.extent_bytes,
            free: human_bytes(vg.free_bytes),
            degraded: group.degraded(),
            message: group.blocked.clone(),
        });
    }
    let mut disks: Vec<&Disk> = inventory
        .disks
        .iter()
        .filter(|disk| disk.verdict != Verdict::NotADisk)
        .collect();
    disks.sort_by(|a, b| (&a.slot, &a.name).cmp(&(&b.slot, &b.name)));
    status.disks = disks
        .into_iter()
        .map(|disk| DiskStatus {
            slot: disk.slot.as_ref().map(ToString::to_string),
            name: disk.name.clone(),
            serial: disk.serial.clone(),
            model: disk.model.clone(),
            size_bytes: disk.size_bytes,
            media: disk.media,
            state: disk.verdict.name().to_owned(),
            reason: disk.verdict.reason(),
        })
        .collect();
    status
}

/// Something about a disk an operator should hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskChange {
    Joined { slot: String, vg: String },
    Refused { slot: String, reason: String },
    Vanished { slot: String },
}

impl DiskChange {
    fn event(&self) -> Event {
        let (DiskChange::Joined { slot, .. }
        | DiskChange::Refused { slot, .. }
        | DiskChange::Vanished { slot }) = self;
        let (type_, reason, note) = match self {
            DiskChange::Joined { slot, vg } => (
                EventType::Normal,
                "DiskJoined",
                format!("disk {slot} joined volume group {vg}"),
            ),
            DiskChange::Refused { slot, reason } => (
                EventType::Warning,
                "DiskRefused",
                format!("disk {slot} left alone: {reason}"),
            ),
            DiskChange::Vanished { slot } => (
                EventType::Warning,
                "DiskVanished",
                format!("disk {slot} is gone"),
            ),
        };
        Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            // Events of one reason, action and object are folded into one
            // series: naming the disk in the action keeps one event per disk.
            action: format!("Rescan {slot}"),
            secondary: None,
        }
    }
}

/// Changes between two reports. A disk is known by its slot, or by its
/// kernel name when it has none.
pub fn disk_changes(
    before: &NodeLocalStorageStatus,
    after: &NodeLocalStorageStatus,
) -> Vec<DiskChange> {
    let key = |disk: &DiskStatus| disk.slot.clone().unwrap_or_else(|| disk.name.clone());
    let find = |status: &NodeLocalStorageStatus, wanted: &str| {
        status
            .disks
            .iter()
            .find(|disk| key(disk) == wanted)
            .cloned()
    };
    let mut changes = Vec::new();
    for disk in &after.disks {
        let slot = key(disk);
        let previous = find(before, &slot);
        let was_member = previous.as_ref().is_some_and(|d| d.state == "member");
        if disk.state == "member" && !was_member {
            let vg = disk
                .media
                .and_then(|media| after.media(media))
                .map(|group| group.vg_name.clone())
                .unwrap_or_default();
            changes.push(DiskChange::Joined { slot, vg });
        } else if previous.is_none()
            && !matches!(disk.state.as_str(), "member" | "usable" | "not-claimed")
        {
            changes.push(DiskChange::Refused {
                slot,
                reason: disk.reason.clone(),
            });
        }
    }
    for disk in &before.disks {
        let slot = key(disk);
        if find(after, &slot).is_none() {
            changes.push(DiskChange::Vanished { slot });
        }
    }
    changes
}

/// The event recorder of this node's agent: every event it writes names the
/// agent and its node as their source.
pub fn recorder(client: Client, node: &str) -> Recorder {
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(node.to_owned()),
    };
    Recorder::new(client, reporter)
}

/// Writes the node's `NodeLocalStorage`, remembering what it last wrote.
pub struct Publisher {
    api: Api<NodeLocalStorage>,
    recorder: Recorder,
    node: String,
    last: Option<NodeLocalStorageStatus>,
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Self {
        Self {
            api: Api::all(client.clone()),
            recorder: recorder(client, node),
            node: node.to_owned(),
            last: None,
        }
    }

    /// Applies `status` if it differs from the last one written, then
    /// records events for the disks that changed. Returns whether it wrote.
    pub async fn publish(&mut self, status: &NodeLocalStorageStatus) -> Result<bool, kube::Error> {
        if self.last.as_ref() == Some(status) {
            return Ok(false);
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let before = match self.last.take() {
            Some(last) => last,
            None => {
                // First write since start: make sure the object exists, and
                // compare with what an earlier run reported, not with nothing.
                let object = serde_json::json!({
                    "apiVersion": NodeLocalStorage::api_version(&()),
                    "kind": NodeLocalStorage::kind(&()),
                    "metadata": { "name": self.node },
                    "spec": { "nodeName": self.node },
                });
                let existing = self
                    .api
                    .patch(&self.node, &params, &Patch::Apply(object))
                    .await?;
                existing.status.unwrap_or_default()
            }
        };
        let patch = serde_json::json!({
            "apiVersion": NodeLocalStorage::api_version(&()),
            "kind": NodeLocalStorage::kind(&()),
            "status": status,
        });
        let written = self
            .api
            .patch_status(&self.node, &params, &Patch::Apply(patch))
            .await?;

        let reference = written.object_ref(&());
        for change in disk_changes(&before, status) {
            // An event lost is not worth failing the report for.
            if let Err(err) = self.recorder.publish(&change.event(), &reference).await {
                tracing::warn!(error = %err, ?change, "cannot record event");
            }
        }
        self.last = Some(status.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Request, Response};
    use kube::client::Body;
    use lvmlocal_proto::MediaClass;
    use serde_json::{Value, json};

    use super::*;
    use crate::api_mock::{assert_apply, body};

    fn disk(slot: &str, state: &str, reason: &str) -> DiskStatus {
        DiskStatus {
            slot: Some(slot.into()),
            name: "nvme0n1".into(),
            size_bytes: 1 << 30,
            media: Some(MediaClass::Nvme),
            state: state.into(),
            reason: reason.into(),
            ..DiskStatus::default()
        }
    }

    fn status(disks: Vec<DiskStatus>) -> NodeLocalStorageStatus {
        NodeLocalStorageStatus {
            nvme: Some(MediaStatus {
                vg_name: "lvmlocal-nvme".into(),
                total_bytes: 1 << 30,
                free_bytes: 1 << 30,
                extent_bytes: 4 << 20,
                free: "1.0Gi".into(),
                ..MediaStatus::default()
            }),
            disks,
            ..NodeLocalStorageStatus::default()
        }
    }

    fn object(status: &NodeLocalStorageStatus) -> Value {
        json!({
            "apiVersion": "lvmlocal.io/v1alpha1",
            "kind": "NodeLocalStorage",
            "metadata": {"name": "node-a", "uid": "5e1f", "resourceVersion": "7"},
            "spec": {"nodeName": "node-a"},
            "status": status,
        })
    }

    #[test]
    fn changes_between_reports() {
        let before = status(vec![
            disk("pci-a", "member", "in volume group lvmlocal-nvme"),
            disk("pci-b", "usable", "blank, will join"),
            disk("pci-c", "member", "in volume group lvmlocal-nvme"),
        ]);
        let after = status(vec![
            disk("pci-a", "member", "in volume group lvmlocal-nvme"),
            disk("pci-b", "member", "in volume group lvmlocal-nvme"),
            disk("pci-d", "signature", "holds data: ext4 signature"),
            // Waiting for the opt-in is not a refusal worth a warning.
            disk(
                "pci-e",
                "not-claimed",
                "blank, would join lvmlocal-nvme, but ...",
            ),
        ]);
        assert_eq!(
            disk_changes(&before, &after),
            [
                DiskChange::Joined {
                    slot: "pci-b".into(),
                    vg: "lvmlocal-nvme".into()
                },
                DiskChange::Refused {
                    slot: "pci-d".into(),
                    reason: "holds data: ext4 signature".into()
                },
                DiskChange::Vanished {
                    slot: "pci-c".into()
                },
            ]
        );
        assert_eq!(disk_changes(&after, &after), []);
    }

    /// The first report creates the object and compares with what an earlier
    /// run left in it; a report equal to the last one sends nothing.
    #[tokio::test]
    async fn publishes_with_server_side_apply_only_on_change() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let earlier = status(vec![disk(
            "pci-a",
            "member",
            "in volume group lvmlocal-nvme",
        )]);
        let now = status(vec![
            disk("pci-a", "member", "in volume group lvmlocal-nvme"),
            disk("pci-b", "mounted", "mounted"),
        ]);
        let (earlier_answer, now_answer) = (object(&earlier), object(&now));
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("object applied");
            assert_apply(
                &request,
                "/apis/lvmlocal.io/v1alpha1/nodelocalstorages/node-a",
            );
            let applied = body(request).await;
            assert_eq!(applied["spec"], json!({"nodeName": "node-a"}));
            assert!(applied.get("status").is_none(), "{applied}");
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&earlier_answer).unwrap(),
            )));

            let (request, send) = handle.next_request().await.expect("status applied");
            assert_eq!(
                request.uri().path(),
                "/apis/lvmlocal.io/v1alpha1/nodelocalstorages/node-a/status"
            );
            let applied = body(request).await;
            assert_eq!(applied["status"]["disks"][1]["state"], "mounted");
            assert_eq!(applied["status"]["nvme"]["vgName"], "lvmlocal-nvme");
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&now_answer).unwrap(),
            )));

            // Only the disk new since the earlier run makes an event.
            let (request, send) = handle.next_request().await.expect("event recorded");
            assert_eq!(request.method(), http::Method::POST);
            assert!(
                request.uri().path().ends_with("/events"),
                "{}",
                request.uri()
            );
            let event = body(request).await;
            assert_eq!(event["reason"], "DiskRefused");
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["regarding"]["name"], "node-a");
            assert_eq!(event["note"], "disk pci-b left alone: mounted");
            assert_eq!(event["action"], "Rescan pci-b");
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&event).unwrap(),
            )));
        });

        let mut publisher = Publisher::new(Client::new(service, "default"), "node-a");
        assert!(publisher.publish(&now).await.unwrap());
        api_server.await.unwrap();
        // The mock has no one answering any more: a request would fail this.
        assert!(!publisher.publish(&now).await.unwrap());
    }
}
