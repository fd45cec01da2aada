//! Keeps the inventory current: one list-and-watch per kind, each event
//! applied to the inventory as it arrives. The only module that talks to the
//! API server.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, future};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::heartbeat;
use lvmlocal_proto::runtime::watch_backoff;
use serde::de::DeserializeOwned;

use crate::extender::Extender;
use crate::inventory::{Inventory, Source};

/// Follows the five kinds until the process stops: the four cluster-wide
/// ones, and the agents' heartbeat Leases in `namespace`. Failed calls are
/// retried with backoff; a watch that has lost its place relists, and the
/// inventory drops what the new listing no longer has.
pub async fn follow_cluster(client: Client, namespace: String, extender: Arc<Extender>) {
    // Listed in pages (500 objects by default): a relist of 100,000 claims
    // then holds one page of whole objects in memory, not all of them.
    future::join5(
        follow(
            Api::<NodeLocalStorage>::all(client.clone()),
            watcher::Config::default(),
            Source::NodeLocalStorage,
            &extender,
            Inventory::apply_storage,
        ),
        follow(
            Api::<LogicalVolume>::all(client.clone()),
            watcher::Config::default(),
            Source::LogicalVolume,
            &extender,
            Inventory::apply_volume,
        ),
        follow(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            watcher::Config::default(),
            Source::PersistentVolumeClaim,
            &extender,
            Inventory::apply_claim,
        ),
        follow(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
            Source::StorageClass,
            &extender,
            Inventory::apply_class,
        ),
        follow(
            Api::<Lease>::namespaced(client, &namespace),
            watcher::Config::default().labels(heartbeat::SELECTOR),
            Source::Lease,
            &extender,
            // Heartbeats are judged by when this reader sees them move.
            |inventory, event| inventory.apply_lease(event, Instant::now()),
        ),
    )
    .await;
}

async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    source: Source,
    extender: &Extender,
    apply: fn(&mut Inventory, Event<K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut events = watcher(api, config).backoff(watch_backoff()).boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if matches!(event, Event::InitDone) {
                    tracing::info!(resource = source.as_str(), "listed");
                }
                apply(&mut extender.inventory(), event);
            }
            Err(err) => {
                extender.metrics().watch_error(source.as_str());
                tracing::warn!(resource = source.as_str(), error = %err, "watch failed; retrying");
            }
        }
    }
}
