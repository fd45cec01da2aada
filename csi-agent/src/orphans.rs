//! The orphan audit: LVs that carry lvmlocal's tag but that no
//! `LogicalVolume` of this node names. They are counted, listed in the
//! node's `NodeLocalStorage` status and announced by an event, never
//! removed: destroying data needs a recorded deletion intent. The audit also
//! publishes the bytes of each volume group that no `LogicalVolume`
//! accounts for (orphans, LVs made by hand, LVs being removed), which the
//! cluster's capacity arithmetic cannot see otherwise.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{
    LogicalVolume, MediaBytes, NodeLocalStorage, OrphanedVolume, ThinPoolStatus, ThinPools,
};
use serde_json::json;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::node_storage::recorder;
use crate::volumes::{GroupUse, LocalVolume, VolumeBackend};

/// How often the LVs are compared with the objects to find orphans.
const ORPHAN_CHECK: Duration = Duration::from_secs(60);
/// After a volume is let go, the watch cache needs a moment to drop its
/// object; an audit sooner would not see the orphan yet.
const SETTLE: Duration = Duration::from_secs(2);
/// Owns `status.orphanedVolumes` alone, so the disk report (another field
/// manager) and this audit never overwrite each other's fields.
const ORPHANS_MANAGER: &str = "lvmlocal-agent-orphans";

/// The LVs no object claims.
pub fn orphans<'a>(local: &'a [LocalVolume], objects: &HashSet<String>) -> Vec<&'a LocalVolume> {
    local
        .iter()
        .filter(|volume| !objects.contains(&volume.id))
        .collect()
}

/// Bytes per class that no object accounts for: what is not lvmlocal's, and
/// lvmlocal's LVs no object names.
pub fn unaccounted(
    usage: &[(lvmlocal_proto::MediaClass, GroupUse)],
    objects: &HashSet<String>,
) -> MediaBytes {
    let mut bytes = MediaBytes::default();
    for (media, group) in usage {
        let orphaned: u64 = group
            .volumes
            .iter()
            .filter(|(id, _)| !objects.contains(id))
            .map(|(_, size)| size)
            .sum();
        *bytes.get_mut(*media) += group.other_bytes + orphaned;
    }
    bytes
}

/// What one audit found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub orphans: Vec<LocalVolume>,
    pub unaccounted: MediaBytes,
    pub pools: ThinPools,
    /// Thin pools grown since the last audit.
    pub grown: Vec<String>,
}

/// How alarming a thin pool's fill is: the higher of its data and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PoolAlarm {
    Fine,
    /// At the threshold the agent grows pools at, and could not grow it.
    Filling,
    /// Writes that need a new block fail.
    Full,
}

/// A thin pool this full (in percent) is reported as filling.
pub const POOL_ALARM_PERCENT: u32 = 80;

fn alarm(pool: &ThinPoolStatus) -> PoolAlarm {
    let fill = pool.data_percent.max(pool.metadata_percent);
    if fill >= 100 {
        PoolAlarm::Full
    } else if fill >= POOL_ALARM_PERCENT {
        PoolAlarm::Filling
    } else {
        PoolAlarm::Fine
    }
}

/// The thin pools `usage` reports, by class.
pub fn pools(usage: &[(lvmlocal_proto::MediaClass, GroupUse)]) -> ThinPools {
    let mut pools = ThinPools::default();
    for (media, group) in usage {
        *pools.get_mut(*media) = group.pool.clone();
    }
    pools
}

/// How an orphan is listed in the node's status.
pub fn listed(volume: &LocalVolume) -> OrphanedVolume {
    OrphanedVolume {
        id: volume.id.clone(),
        media: volume.media,
        device_path: volume.device_path.clone(),
        size_bytes: volume.size_bytes,
        pvc: volume.pvc.clone(),
    }
}

/// Compares the LVs with the objects, so an LV no object claims is seen.
pub struct OrphanCheck<B> {
    volumes: Arc<B>,
    objects: Store<LogicalVolume>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    api: Api<NodeLocalStorage>,
    recorder: Recorder,
    node: String,
    /// Orphans already announced, so each is announced when it appears.
    reported: BTreeSet<String>,
    /// What was last written to the status; None until a write succeeds.
    published: Option<(Vec<OrphanedVolume>, MediaBytes, ThinPools)>,
    /// The alarm each class's thin pool was last announced at.
    alarms: HashMap<MediaClass, PoolAlarm>,
}

impl<B: VolumeBackend> OrphanCheck<B> {
    pub fn new(
        client: Client,
        node: &str,
        volumes: Arc<B>,
        objects: Store<LogicalVolume>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            volumes,
            objects,
            metrics,
            wake,
            api: Api::all(client.clone()),
            recorder: recorder(client, node),
            node: node.to_owned(),
            reported: BTreeSet::new(),
            published: None,
            alarms: HashMap::new(),
        }
    }

    pub async fn run(mut self) {
        // Before the first full listing every LV would look orphaned.
        if self.objects.wait_until_ready().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(ORPHAN_CHECK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.wake.notified() => tokio::time::sleep(SETTLE).await,
            }
            if let Some(found) = self.audit().await {
                self.publish(found).await;
            }
        }
    }

    /// Writes the orphans and the unaccounted bytes into the node's status
    /// when they changed, and announces each new orphan with an event on the
    /// node's object.
    async fn publish(&mut self, audit: Audit) {
        let Audit {
            orphans: found,
            unaccounted,
            pools,
            grown,
        } = audit;
        self.metrics.thin_pools(&pools);
        let list: Vec<OrphanedVolume> = found.iter().map(listed).collect();
        let report = (list, unaccounted, pools.clone());
        if self.published.as_ref() != Some(&report) {
            let mut status = json!({ "unaccountedBytes": unaccounted });
            if !report.0.is_empty() {
                status["orphanedVolumes"] = json!(report.0);
            }
            if pools != ThinPools::default() {
                status["thinPools"] = json!(pools);
            }
            let patch = json!({
                "apiVersion": NodeLocalStorage::api_version(&()),
                "kind": NodeLocalStorage::kind(&()),
                "status": status,
            });
            let params = PatchParams::apply(ORPHANS_MANAGER).force();
            match self
                .api
                .patch_status(&self.node, &params, &Patch::Apply(patch))
                .await
            {
                Ok(_) => self.published = Some(report),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot list the orphaned LVs in NodeLocalStorage");
                    self.published = None;
                }
            }
        }
        let reference = ObjectReference {
            api_version: Some(NodeLocalStorage::api_version(&()).into_owned()),
            kind: Some(NodeLocalStorage::kind(&()).into_owned()),
            name: Some(self.node.clone()),
            ..ObjectReference::default()
        };
        for note in grown {
            let event = Event {
                type_: EventType::Normal,
                reason: "ThinPoolGrown".into(),
                note: Some(note),
                action: "Grow".into(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %err, "cannot record event");
            }
        }
        for media in MediaClass::ALL {
            let now = pools.get(media).map_or(PoolAlarm::Fine, alarm);
            let before = self.alarms.insert(media, now).unwrap_or(PoolAlarm::Fine);
            if now <= before {
                continue;
            }
            let pool = pools.get(media).expect("an alarm needs a pool");
            let (reason, what) = match now {
                PoolAlarm::Full => (
                    "ThinPoolFull",
                    "is full: writes of its thin volumes that need a new block fail with an I/O \
                     error until room is made (delete snapshots or volumes, or add a disk)",
                ),
                _ => (
                    "ThinPoolFilling",
                    "is filling and its volume group has no room to grow it: add a disk, or \
                     delete snapshots or volumes",
                ),
            };
            let event = Event {
                type_: EventType::Warning,
                reason: reason.into(),
                note: Some(format!(
                    "the {media} thin pool {} {what}; data {}% of {} bytes, metadata {}%",
                    pool.name, pool.data_percent, pool.data_bytes, pool.metadata_percent
                )),
                action: "Audit".into(),
                secondary: None,
            };
            tracing::warn!(%media, data = pool.data_percent, metadata = pool.metadata_percent, "{reason}");
            if let Err(err) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %err, "cannot record event");
            }
        }
        for volume in found.iter().filter(|v| !self.reported.contains(&v.id)) {
            let event = Event {
                type_: EventType::Warning,
                reason: "OrphanedVolume".into(),
                note: Some(format!(
                    "LV {} ({} bytes{}) carries lvmlocal's tags but no LogicalVolume names it; \
                     it is kept. A LogicalVolume named {} adopts it",
                    volume.device_path,
                    volume.size_bytes,
                    volume
                        .pvc
                        .as_deref()
                        .map(|pvc| format!(", made for PVC {pvc}"))
                        .unwrap_or_default(),
                    volume.id,
                )),
                action: "Audit".into(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %err, volume = %volume.id, "cannot record event");
            }
        }
        self.reported = found.into_iter().map(|volume| volume.id).collect();
    }

    /// The LVs no object names now, counted and logged, and the bytes no
    /// object accounts for; None when the LVs cannot be listed.
    async fn audit(&mut self) -> Option<Audit> {
        // LVs first: an LV is made only once its object is in the cache, so
        // a volume being made now cannot pass for an orphan.
        let listed = async {
            let grown = self.volumes.tend_pools().await?;
            Ok::<_, crate::volumes::VolumeError>((
                self.volumes.list().await?,
                self.volumes.usage().await?,
                grown,
            ))
        };
        let (local, usage, grown) = match listed.await {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list LVs to look for orphans");
                return None;
            }
        };
        let objects: HashSet<String> = self
            .objects
            .state()
            .iter()
            .map(|lv| lv.name_any())
            .collect();
        let found = orphans(&local, &objects);
        self.metrics.orphaned_volumes(found.len());
        for volume in found.iter().filter(|v| !self.reported.contains(&v.id)) {
            tracing::warn!(
                volume = %volume.id,
                vg = %volume.vg,
                bytes = volume.size_bytes,
                pvc = volume.pvc.as_deref().unwrap_or("-"),
                "orphaned LV: it carries lvmlocal's tag but no LogicalVolume names it; left in place"
            );
        }
        Some(Audit {
            orphans: found.into_iter().cloned().collect(),
            unaccounted: unaccounted(&usage, &objects),
            pools: pools(&usage),
            grown,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::{reflector, watcher};
    use lvmlocal_proto::MediaClass;
    use lvmlocal_proto::rpc::RpcMetrics;

    use super::*;
    use crate::api_mock::{answer, assert_status_apply, body};
    use crate::fake_lvm::{FakeLvm, local, object};

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn orphans_are_the_lvs_no_object_names() {
        let lvs = [
            local("pvc-a", MediaClass::Nvme, GIB),
            local("pvc-b", MediaClass::Hdd, GIB),
            local("pvc-c", MediaClass::Ssd, GIB),
        ];
        let names = |names: &[&str]| -> HashSet<String> {
            names.iter().map(|name| name.to_string()).collect()
        };
        let ids = |found: Vec<&LocalVolume>| -> Vec<String> {
            found.into_iter().map(|volume| volume.id.clone()).collect()
        };
        assert_eq!(
            ids(orphans(&lvs, &names(&["pvc-a", "pvc-c", "pvc-x"]))),
            ["pvc-b"]
        );
        assert_eq!(ids(orphans(&lvs, &names(&[]))), ["pvc-a", "pvc-b", "pvc-c"]);
        assert!(orphans(&lvs, &names(&["pvc-a", "pvc-b", "pvc-c"])).is_empty());
        assert!(orphans(&[], &names(&["pvc-a"])).is_empty());
    }

    #[tokio::test]
    async fn the_orphan_check_counts_lists_and_announces_lvs_without_objects() {
        let backend = Arc::new(
            FakeLvm::new(0)
                .with(local("pvc-1", MediaClass::Nvme, GIB))
                .with(local("pvc-gone", MediaClass::Hdd, GIB)),
        );
        // An LV made by hand in the HDD group.
        backend.other.lock().unwrap().hdd = 3 * MIB;
        let (objects, mut writer) = reflector::store::<LogicalVolume>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(object(GIB, 1)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let metrics = Arc::new(Metrics::new(&RpcMetrics::default()));
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut check = OrphanCheck::new(
            Client::new(service, "default"),
            "node-a",
            backend.clone(),
            objects,
            metrics.clone(),
            Arc::default(),
        );
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("status applied");
            assert_status_apply(&request, "node-a", "lvmlocal-agent-orphans");
            let applied = body(request).await;
            assert_eq!(
                applied["status"],
                json!({"unaccountedBytes": {"nvme": 0, "ssd": 0, "hdd": GIB + 3 * MIB}, "orphanedVolumes": [{
                    "id": "pvc-gone",
                    "media": "hdd",
                    "devicePath": "/dev/lvmlocal-hdd/pvc-gone",
                    "sizeBytes": GIB,
                    "pvc": "db/data-0",
                }]})
            );
            answer(
                send,
                &json!({"apiVersion": "lvmlocal.io/v1alpha1", "kind": "NodeLocalStorage",
                "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}}),
            );
            let (request, send) = handle.next_request().await.expect("event");
            assert_eq!(request.method(), http::Method::POST);
            let event = body(request).await;
            assert_eq!(event["reason"], "OrphanedVolume");
            assert_eq!(event["regarding"]["name"], "node-a");
            let note = event["note"].as_str().unwrap();
            assert!(note.contains("/dev/lvmlocal-hdd/pvc-gone"), "{note}");
            answer(send, &event);
        });
        let found = check.audit().await.unwrap();
        assert!(
            metrics
                .encode()
                .contains("lvmlocal_agent_orphaned_volumes 1"),
            "{}",
            metrics.encode()
        );
        check.publish(found).await;
        api_server.await.unwrap();
        assert_eq!(check.reported, BTreeSet::from(["pvc-gone".to_owned()]));
        assert_eq!(
            backend.ids(),
            ["pvc-1", "pvc-gone"],
            "an orphan is never removed"
        );
        // Nothing changed: nothing is written or announced again (the mock
        // is gone, so any request would fail the publish and reset it).
        let found = check.audit().await.unwrap();
        check.publish(found).await;
        assert!(check.published.is_some());

        writer.apply_watcher_event(&watcher::Event::Apply({
            let mut claimed = object(GIB, 1);
            claimed.metadata.name = Some("pvc-gone".into());
            claimed
        }));
        let found = check.audit().await.unwrap();
        assert!(found.orphans.is_empty());
        assert_eq!(
            found.unaccounted,
            MediaBytes {
                nvme: 0,
                ssd: 0,
                hdd: 3 * MIB
            },
            "what is not lvmlocal's stays unaccounted"
        );
        assert!(
            metrics
                .encode()
                .contains("lvmlocal_agent_orphaned_volumes 0")
        );
    }
}
