//! Watch caches of the objects the controller reads often: `LogicalVolume`s,
//! `NodeLocalStorage`s, Nodes (metadata only) and the agents' heartbeats,
//! fed from the API server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::heartbeat::{self, Beat, Silence};
use lvmlocal_proto::runtime::watch_backoff;
use tokio::sync::watch;

/// Read-only views of the watch caches. Cheap to clone.
#[derive(Clone)]
pub struct Caches {
    volumes: Cache<LogicalVolume>,
    storage: Cache<NodeLocalStorage>,
    nodes: Cache<PartialObjectMeta<Node>>,
    beats: Beats,
    beats_listed: watch::Receiver<bool>,
    /// Bumped after every change to the `LogicalVolume` cache.
    changes: watch::Receiver<u64>,
}

/// What was last seen of each node's heartbeat; `None` until listed.
type Beats = Arc<Mutex<Option<HashMap<String, Beat>>>>;

/// Fills the [`Caches`] from the API server.
pub struct CacheFeed {
    volumes: reflector::store::Writer<LogicalVolume>,
    storage: reflector::store::Writer<NodeLocalStorage>,
    nodes: reflector::store::Writer<PartialObjectMeta<Node>>,
    beats: Beats,
    beats_listed: watch::Sender<bool>,
    changes: watch::Sender<u64>,
}

/// Empty caches and the feed that fills them.
pub fn caches() -> (Caches, CacheFeed) {
    let (volumes, volumes_writer) = reflector::store();
    let (storage, storage_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();
    let (changes_tx, changes) = watch::channel(0);
    let beats = Beats::default();
    let (beats_listed, _) = watch::channel(false);
    (
        Caches {
            volumes,
            storage,
            nodes,
            beats: beats.clone(),
            beats_listed: beats_listed.subscribe(),
            changes,
        },
        CacheFeed {
            volumes: volumes_writer,
            storage: storage_writer,
            nodes: nodes_writer,
            beats,
            beats_listed,
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
        let _ = self.beats_listed.clone().wait_for(|listed| *listed).await;
    }

    /// Why the agent of `node` counts as silent at `now`, if it does.
    pub fn silence(&self, node: &str, now: Instant) -> Option<Silence> {
        let beats = self.beats.lock().expect("heartbeats poisoned");
        // Before the first listing nothing is known, and nothing is judged.
        let beats = beats.as_ref()?;
        heartbeat::silence(beats.get(node), now)
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
    /// Watches `LogicalVolume`s, `NodeLocalStorage`s, Nodes (metadata
    /// only) and the heartbeat Leases in `namespace` into the caches,
    /// retrying with backoff; never returns.
    pub async fn run(self, client: Client, namespace: String) {
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
        let beats = self.beats;
        let beats_listed = self.beats_listed;
        let mut listing: Option<HashMap<String, Beat>> = None;
        let leases = watcher(
            Api::<Lease>::namespaced(client.clone(), &namespace),
            watcher::Config::default().labels(heartbeat::SELECTOR),
        )
        .backoff(watch_backoff())
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    apply_beat(&beats, &mut listing, event, Instant::now());
                    if listing.is_none() {
                        beats_listed.send_replace(true);
                    }
                }
                Err(err) => tracing::warn!(error = %err, %namespace, "watching heartbeat Leases"),
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
        tokio::join!(volumes, storage, nodes, leases);
    }
}

/// Folds one heartbeat watch event into `beats`. A re-list is gathered in
/// `listing` and replaces the map when complete; a beat seen before keeps
/// its clock across it.
fn apply_beat(
    beats: &Beats,
    listing: &mut Option<HashMap<String, Beat>>,
    event: watcher::Event<Lease>,
    now: Instant,
) {
    let mut beats = beats.lock().expect("heartbeats poisoned");
    let observe = |known: Option<&HashMap<String, Beat>>, lease: &Lease| {
        let node = heartbeat::node_of(lease)?;
        let previous = known.and_then(|beats| beats.get(node));
        Some((node.to_owned(), Beat::observe(previous, lease, now)))
    };
    match event {
        watcher::Event::Init => *listing = Some(HashMap::new()),
        watcher::Event::InitApply(lease) => {
            if let Some((node, beat)) = observe(beats.as_ref(), &lease)
                && let Some(listing) = listing.as_mut()
            {
                listing.insert(node, beat);
            }
        }
        watcher::Event::InitDone => *beats = Some(listing.take().unwrap_or_default()),
        watcher::Event::Apply(lease) => {
            if let Some((node, beat)) = observe(beats.as_ref(), &lease) {
                beats.get_or_insert_default().insert(node, beat);
            }
        }
        watcher::Event::Delete(lease) => {
            if let (Some(node), Some(beats)) = (heartbeat::node_of(&lease), beats.as_mut()) {
                beats.remove(node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn lease(node: &str, renewed: i64) -> Lease {
        let mut lease = Lease::default();
        lease.metadata.name = Some(heartbeat::lease_name(node));
        lease.metadata.labels = Some(
            [(
                heartbeat::LABEL.to_owned(),
                heartbeat::LABEL_VALUE.to_owned(),
            )]
            .into(),
        );
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(10),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        });
        lease
    }

    #[test]
    fn beats_follow_the_watch_and_keep_their_clock_across_a_relist() {
        let beats = Beats::default();
        let mut listing = None;
        let start = Instant::now();
        let silent_at = |at: Instant, node: &str| {
            let beats = beats.lock().unwrap();
            heartbeat::silence(beats.as_ref().unwrap().get(node), at)
        };
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(lease("a", 1)),
            watcher::Event::InitApply(lease("b", 1)),
            watcher::Event::InitDone,
        ] {
            apply_beat(&beats, &mut listing, event, start);
        }
        let later = start + Duration::from_secs(8);
        apply_beat(
            &beats,
            &mut listing,
            watcher::Event::Apply(lease("a", 2)),
            later,
        );
        let after = start + Duration::from_secs(15);
        assert_eq!(silent_at(after, "a"), None);
        assert_eq!(
            silent_at(after, "b"),
            Some(Silence::For(Duration::from_secs(15)))
        );

        // A re-list of the same renewal does not make b look alive.
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(lease("b", 1)),
            watcher::Event::InitDone,
        ] {
            apply_beat(&beats, &mut listing, event, after);
        }
        assert!(silent_at(after, "b").is_some());
        assert_eq!(silent_at(after, "a"), Some(Silence::Never));
        apply_beat(
            &beats,
            &mut listing,
            watcher::Event::Delete(lease("b", 1)),
            after,
        );
        assert_eq!(silent_at(after, "b"), Some(Silence::Never));
    }
}
