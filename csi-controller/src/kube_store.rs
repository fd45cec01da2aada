//! The cluster's store: one `LogicalVolume` object per volume, named by its
//! id, carried out by the agent of its node; `NodeLocalStorage` for the
//! capacity of each node. Reads that decide idempotency go to the API
//! server; waiting, listing and capacity use watch caches.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{
    LV_FINALIZER, LogicalVolume, LogicalVolumePhase, LogicalVolumeSpec, NodeLocalStorage,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::placement::NodeCapacity;
use crate::store::{Store, StoreError};
use crate::volume::{Access, NewVolume, Volume, VolumeId, VolumeState};

/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "lvmlocal-controller";

/// Read-only views of the watch caches. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    volumes: Cache<LogicalVolume>,
    storage: Cache<NodeLocalStorage>,
    nodes: Cache<PartialObjectMeta<Node>>,
    /// Bumped after every change to the `LogicalVolume` cache.
    changes: watch::Receiver<u64>,
}

/// Fills the [`Caches`] from the API server.
pub struct CacheFeed {
    volumes: reflector::store::Writer<LogicalVolume>,
    storage: reflector::store::Writer<NodeLocalStorage>,
    nodes: reflector::store::Writer<PartialObjectMeta<Node>>,
    changes: watch::Sender<u64>,
}

/// Empty caches and the feed that fills them.
pub fn caches() -> (Caches, CacheFeed) {
    let (volumes, volumes_writer) = reflector::store();
    let (storage, storage_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();
    let (changes_tx, changes) = watch::channel(0);
    (
        Caches {
            volumes,
            storage,
            nodes,
            changes,
        },
        CacheFeed {
            volumes: volumes_writer,
            storage: storage_writer,
            nodes: nodes_writer,
            changes: changes_tx,
        },
    )
}

impl Caches {
    /// Resolves once every cache holds a full listing.
    pub async fn synced(&self) {
        // The writers live as long as the feed; if it is gone the process
        // is stopping and no caller is left to answer.
        let _ = self.volumes.wait_until_ready().await;
        let _ = self.storage.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
    }

    pub fn volume(&self, id: &str) -> Option<std::sync::Arc<LogicalVolume>> {
        self.volumes.get(&ObjectRef::new(id))
    }

    pub fn volumes(&self) -> Vec<std::sync::Arc<LogicalVolume>> {
        self.volumes.state()
    }

    /// Names of the nodes that exist now.
    pub fn node_names(&self) -> HashSet<String> {
        self.nodes
            .state()
            .iter()
            .map(|node| node.name_any())
            .collect()
    }
}

impl CacheFeed {
    /// Watches `LogicalVolume`s, `NodeLocalStorage`s and Nodes (metadata
    /// only) into the caches, retrying with backoff; never returns.
    pub async fn run(self, client: Client) {
        let changes = self.changes;
        let volumes = watcher(
            Api::<LogicalVolume>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        // Managed fields are most of an object's size and never read.
        .modify(|lv| lv.managed_fields_mut().clear())
        .reflect(self.volumes)
        .for_each(|event| {
            match event {
                Ok(_) => {
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Err(err) => tracing::warn!(error = %err, "watching LogicalVolumes"),
            }
            async {}
        });
        let storage = watcher(
            Api::<NodeLocalStorage>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|nls| nls.managed_fields_mut().clear())
        .reflect(self.storage)
        .for_each(|event| {
            if let Err(err) = event {
                tracing::warn!(error = %err, "watching NodeLocalStorages");
            }
            async {}
        });
        let nodes = watcher(
            Api::<PartialObjectMeta<Node>>::all(client),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|node| node.managed_fields_mut().clear())
        .reflect(self.nodes)
        .for_each(|event| {
            if let Err(err) = event {
                tracing::warn!(error = %err, "watching Nodes");
            }
            async {}
        });
        tokio::join!(volumes, storage, nodes);
    }
}

/// The Kubernetes [`Store`].
#[derive(Clone)]
pub struct KubeStore {
    api: Api<LogicalVolume>,
    caches: Caches,
}

impl KubeStore {
    pub fn new(client: Client, caches: Caches) -> Self {
        Self {
            api: Api::all(client),
            caches,
        }
    }
}

impl Store for KubeStore {
    async fn get(&self, id: &VolumeId) -> Result<Option<Volume>, StoreError> {
        let lv = self.api.get_opt(id.as_str()).await.map_err(|err| {
            StoreError::unavailable(format!("cannot read LogicalVolume {id}"), err)
        })?;
        lv.as_ref().map(volume_of).transpose()
    }

    async fn create(&self, new: NewVolume) -> Result<Volume, StoreError> {
        let lv = LogicalVolume {
            metadata: ObjectMeta {
                name: Some(new.id.to_string()),
                // Set from the first moment, so no deletion can slip in
                // before the agent has seen the object and made the LV.
                finalizers: Some(vec![LV_FINALIZER.to_owned()]),
                ..ObjectMeta::default()
            },
            spec: LogicalVolumeSpec {
                node_name: new.node,
                media: new.media,
                size_bytes: new.size_bytes,
                fs_type: new.access.fs_type().map(|fs| fs.to_string()),
                pvc: new.pvc,
            },
            status: None,
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match self.api.create(&params, &lv).await {
            Ok(created) => volume_of(&created),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                // Another call made it first (or this one, before a crash).
                self.get(&new.id).await?.ok_or_else(|| {
                    StoreError::unavailable(
                        format!("LogicalVolume {} vanished right after a conflict", new.id),
                        "retry",
                    )
                })
            }
            Err(err) => Err(StoreError::unavailable(
                format!("cannot create LogicalVolume {}", new.id),
                err,
            )),
        }
    }

    async fn wait(&self, volume: &Volume, deadline: Instant) -> Result<Volume, StoreError> {
        let started = Instant::now();
        let mut changes = self.caches.changes.clone();
        loop {
            changes.borrow_and_update();
            if let Some(lv) = self.caches.volume(volume.id.as_str()) {
                let seen = volume_of(&lv)?;
                // An older generation in the cache says nothing about the
                // request the caller just made.
                if seen.generation >= volume.generation && seen.settled() {
                    return Ok(seen);
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(closed)) => {
                    return Err(StoreError::unavailable(
                        "the LogicalVolume watch has stopped",
                        closed,
                    ));
                }
                Err(_) => {
                    return Err(StoreError::Timeout {
                        id: volume.id.clone(),
                        waited: started.elapsed(),
                    });
                }
            }
        }
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), StoreError> {
        match self.api.delete(id.as_str(), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(err) => Err(StoreError::unavailable(
                format!("cannot delete LogicalVolume {id}"),
                err,
            )),
        }
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StoreError> {
        let patch = json!({ "spec": { "sizeBytes": size_bytes } });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let lv = self
            .api
            .patch(volume.id.as_str(), &params, &Patch::Merge(&patch))
            .await
            .map_err(|err| {
                StoreError::unavailable(format!("cannot resize LogicalVolume {}", volume.id), err)
            })?;
        volume_of(&lv)
    }

    async fn list(
        &self,
        after: Option<&VolumeId>,
        limit: usize,
    ) -> Result<Vec<Volume>, StoreError> {
        let mut volumes: Vec<Volume> = self
            .caches
            .volumes()
            .iter()
            .filter(|lv| lv.metadata.deletion_timestamp.is_none())
            .filter_map(|lv| match volume_of(lv) {
                Ok(volume) => Some(volume),
                Err(err) => {
                    tracing::warn!(error = %err, "skipping a LogicalVolume in ListVolumes");
                    None
                }
            })
            .filter(|volume| after.is_none_or(|after| &volume.id > after))
            .collect();
        volumes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        volumes.truncate(limit);
        Ok(volumes)
    }

    async fn capacities(&self, media: MediaClass) -> Result<Vec<NodeCapacity>, StoreError> {
        Ok(capacities(
            media,
            &self.caches.storage.state(),
            &self.caches.volumes(),
            &self.caches.node_names(),
        ))
    }
}

/// The volume groups of `media` on existing nodes, each charged with the
/// `LogicalVolume`s placed on it (including those being made or removed).
pub fn capacities(
    media: MediaClass,
    storage: &[std::sync::Arc<NodeLocalStorage>],
    volumes: &[std::sync::Arc<LogicalVolume>],
    nodes: &HashSet<String>,
) -> Vec<NodeCapacity> {
    let mut allocated: HashMap<&str, u64> = HashMap::new();
    for lv in volumes.iter().filter(|lv| lv.spec.media == media) {
        let actual = lv.status.as_ref().and_then(|s| s.size_bytes).unwrap_or(0);
        *allocated.entry(lv.spec.node_name.as_str()).or_default() += lv.spec.size_bytes.max(actual);
    }
    storage
        .iter()
        .filter(|nls| nls.metadata.deletion_timestamp.is_none())
        .filter(|nls| nodes.contains(&nls.spec.node_name))
        .filter_map(|nls| {
            let group = nls.status.as_ref()?.media(media)?;
            let node = nls.spec.node_name.clone();
            Some(NodeCapacity {
                allocated_bytes: allocated.get(node.as_str()).copied().unwrap_or(0),
                node,
                total_bytes: group.total_bytes,
                reported_free_bytes: group.free_bytes,
                extent_bytes: group.extent_bytes,
                degraded: group.degraded,
            })
        })
        .collect()
}

/// What a `LogicalVolume` says about its volume.
pub fn volume_of(lv: &LogicalVolume) -> Result<Volume, StoreError> {
    let name = lv.name_any();
    let id = VolumeId::parse(&name)
        .map_err(|err| StoreError::Corrupt(format!("LogicalVolume {name:?}: {err}")))?;
    let access = match &lv.spec.fs_type {
        None => Access::Block,
        Some(fs) => Access::Filesystem(
            fs.parse()
                .map_err(|err| StoreError::Corrupt(format!("LogicalVolume {name}: {err}")))?,
        ),
    };
    Ok(Volume {
        id,
        node: lv.spec.node_name.clone(),
        media: lv.spec.media,
        access,
        size_bytes: lv.spec.size_bytes,
        state: state_of(lv),
        generation: lv.metadata.generation.unwrap_or(0),
    })
}

fn state_of(lv: &LogicalVolume) -> VolumeState {
    if lv.metadata.deletion_timestamp.is_some() {
        return VolumeState::Deleting;
    }
    let Some(status) = &lv.status else {
        return VolumeState::Pending;
    };
    // A status written for an older generation answers an older request;
    // agents that do not write observedGeneration are taken at their word.
    let current = match (status.observed_generation, lv.metadata.generation) {
        (Some(observed), Some(generation)) => observed >= generation,
        _ => true,
    };
    match status.phase {
        LogicalVolumePhase::Ready => match status.size_bytes {
            Some(size_bytes) => VolumeState::Ready { size_bytes },
            None if current => VolumeState::Ready {
                size_bytes: lv.spec.size_bytes,
            },
            None => VolumeState::Pending,
        },
        LogicalVolumePhase::Failed if current => VolumeState::Failed {
            message: status
                .message
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
            lv_exists: status.size_bytes.is_some() || status.device_path.is_some(),
        },
        _ => VolumeState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lvmlocal_proto::crd::{
        LogicalVolumeStatus, MediaStatus, NodeLocalStorageSpec, NodeLocalStorageStatus,
    };
    use std::sync::Arc;

    fn lv(name: &str, node: &str, size: u64, generation: i64) -> LogicalVolume {
        let mut lv = LogicalVolume::new(
            name,
            LogicalVolumeSpec {
                node_name: node.into(),
                media: MediaClass::Nvme,
                size_bytes: size,
                fs_type: Some("ext4".into()),
                pvc: None,
            },
        );
        lv.metadata.generation = Some(generation);
        lv
    }

    fn status(
        phase: LogicalVolumePhase,
        size: Option<u64>,
        observed: Option<i64>,
    ) -> LogicalVolumeStatus {
        LogicalVolumeStatus {
            phase,
            device_path: size.map(|_| "/dev/lvmlocal-nvme/v".into()),
            size_bytes: size,
            message: (phase == LogicalVolumePhase::Failed).then(|| "not enough space".into()),
            observed_generation: observed,
        }
    }

    #[test]
    fn state_follows_the_agent_status_of_the_current_generation() {
        use LogicalVolumePhase::*;
        let cases = [
            (None, VolumeState::Pending),
            (Some(status(Pending, None, Some(2))), VolumeState::Pending),
            (
                Some(status(Ready, Some(100), Some(2))),
                VolumeState::Ready { size_bytes: 100 },
            ),
            // Mid-expansion: ready at the old size, not settled for the new.
            (
                Some(status(Ready, Some(50), Some(1))),
                VolumeState::Ready { size_bytes: 50 },
            ),
            (
                Some(status(Ready, None, None)),
                VolumeState::Ready { size_bytes: 100 },
            ),
            (Some(status(Ready, None, Some(1))), VolumeState::Pending),
            (
                Some(status(Failed, None, Some(2))),
                VolumeState::Failed {
                    message: "not enough space".into(),
                    lv_exists: false,
                },
            ),
            (
                Some(status(Failed, Some(50), None)),
                VolumeState::Failed {
                    message: "not enough space".into(),
                    lv_exists: true,
                },
            ),
            // A failure of the previous request says nothing about this one.
            (Some(status(Failed, None, Some(1))), VolumeState::Pending),
        ];
        for (status, want) in cases {
            let mut object = lv("v", "n", 100, 2);
            object.status = status.clone();
            assert_eq!(state_of(&object), want, "{status:?}");
        }
        let mut deleting = lv("v", "n", 100, 2);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(state_of(&deleting), VolumeState::Deleting);
    }

    #[test]
    fn volume_of_refuses_foreign_objects() {
        assert!(volume_of(&lv("v", "n", 1, 1)).is_ok());
        let err = volume_of(&lv("Bad_Name", "n", 1, 1)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        let mut weird_fs = lv("v", "n", 1, 1);
        weird_fs.spec.fs_type = Some("ntfs".into());
        assert!(matches!(volume_of(&weird_fs), Err(StoreError::Corrupt(_))));
        let mut raw = lv("v", "n", 1, 1);
        raw.spec.fs_type = None;
        assert_eq!(volume_of(&raw).unwrap().access, Access::Block);
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
        let storage = [nls("a", 100, 100), nls("b", 100, 90), nls("gone", 100, 100)];
        let mut grown = lv("v2", "a", 10, 1);
        grown.status = Some(status(LogicalVolumePhase::Ready, Some(12), Some(1)));
        let volumes = [
            Arc::new(lv("v1", "a", 30, 1)),
            Arc::new(grown),
            Arc::new(lv("v3", "b", 10, 1)),
        ];
        let nodes: HashSet<String> = ["a".to_owned(), "b".to_owned()].into();
        let mut got = capacities(MediaClass::Nvme, &storage, &volumes, &nodes);
        got.sort_by(|x, y| x.node.cmp(&y.node));
        let summary: Vec<(&str, u64, u64)> = got
            .iter()
            .map(|c| (c.node.as_str(), c.allocated_bytes, c.free_bytes()))
            .collect();
        assert_eq!(summary, [("a", 42, 58), ("b", 10, 90)]);
        assert!(capacities(MediaClass::Hdd, &storage, &volumes, &nodes).is_empty());
    }
}
