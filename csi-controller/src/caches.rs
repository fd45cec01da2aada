//! Watch caches of the objects the controller reads often: `LogicalVolume`s,
//! `NodeLocalStorage`s and Nodes (metadata only), fed from the API server.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::runtime::watch_backoff;
use tokio::sync::watch;

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

    pub fn volume(&self, id: &str) -> Option<Arc<LogicalVolume>> {
        self.volumes.get(&ObjectRef::new(id))
    }

    pub fn volumes(&self) -> Vec<Arc<LogicalVolume>> {
        self.volumes.state()
    }

    pub fn storage(&self) -> Vec<Arc<NodeLocalStorage>> {
        self.storage.state()
    }

    /// A receiver that sees every change to the `LogicalVolume` cache.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
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
        .backoff(watch_backoff())
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
        .backoff(watch_backoff())
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
        .backoff(watch_backoff())
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
