//! A `Store` kept in memory, with a simulated node agent, for driving the
//! Controller service through csi-sanity's rules without a cluster.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::io_limits::IoLimits;
use lvmlocal_proto::placement::NodeCapacity;
use lvmlocal_proto::store::{Store, StoreError};
use lvmlocal_proto::volume::{NewVolume, Volume, VolumeId, VolumeState};
use tokio::sync::watch;
use tokio::time::Instant;

/// How the simulated agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agent {
    /// Makes every LV at once, if it fits in the VG.
    Instant,
    /// Answers nothing until `MemoryStore::answer` is called.
    Silent,
}

pub struct Group {
    pub node: &'static str,
    pub media: MediaClass,
    pub total_bytes: u64,
}

pub struct MemoryStore {
    agent: Mutex<Agent>,
    groups: Vec<Group>,
    volumes: Mutex<BTreeMap<VolumeId, Volume>>,
    hidden: Mutex<u64>,
    changed: watch::Sender<()>,
}

pub const EXTENT: u64 = 4 << 20;

impl MemoryStore {
    pub fn new(agent: Agent, groups: Vec<Group>) -> Self {
        Self {
            agent: Mutex::new(agent),
            groups,
            volumes: Mutex::new(BTreeMap::new()),
            hidden: Mutex::new(0),
            changed: watch::channel(()).0,
        }
    }

    /// Lets a silent agent act on everything pending, as the instant one would.
    pub fn answer(&self) {
        *self.agent.lock().unwrap() = Agent::Instant;
        let ids: Vec<VolumeId> = self.volumes.lock().unwrap().keys().cloned().collect();
        for id in ids {
            self.act(&id);
        }
        self.changed.send_replace(());
    }

    pub fn volume(&self, id: &str) -> Option<Volume> {
        let id = VolumeId::parse(id).unwrap();
        self.volumes.lock().unwrap().get(&id).cloned()
    }

    fn used(
        &self,
        volumes: &BTreeMap<VolumeId, Volume>,
        node: &str,
        media: MediaClass,
        but: &VolumeId,
    ) -> u64 {
        volumes
            .values()
            .filter(|v| v.node == node && v.media == media && &v.id != but)
            .map(|v| match v.state {
                VolumeState::Ready { size_bytes } => charge(v, size_bytes),
                _ => 0,
            })
            .sum()
    }

    /// What an agent does with a volume: make or grow its LV if it fits.
    fn act(&self, id: &VolumeId) {
        if *self.agent.lock().unwrap() == Agent::Silent {
            return;
        }
        let mut volumes = self.volumes.lock().unwrap();
        let Some(volume) = volumes.get(id).cloned() else {
            return;
        };
        let group = self
            .groups
            .iter()
            .find(|g| g.node == volume.node && g.media == volume.media)
            .expect("volume placed on a known group");
        let used =
            self.used(&volumes, &volume.node, volume.media, id) + *self.hidden.lock().unwrap();
        let lv_exists = volume.actual_bytes.is_some();
        // An LV never shrinks.
        let wanted = volume.size_bytes.max(volume.actual_bytes.unwrap_or(0));
        let stored = volumes.get_mut(id).unwrap();
        let has_it = volume.actual_bytes.is_some_and(|actual| actual >= wanted);
        if has_it || used + charge(&volume, wanted) <= group.total_bytes {
            stored.state = VolumeState::Ready { size_bytes: wanted };
            stored.actual_bytes = Some(wanted);
        } else {
            stored.state = VolumeState::Failed {
                message: "not enough free space in the volume group".into(),
                lv_exists,
            };
        }
    }

    /// Makes the agent find `bytes` less in every group than the
    /// controller counts, as when an LV nobody stored holds space.
    pub fn hide(&self, bytes: u64) {
        *self.hidden.lock().unwrap() = bytes;
    }
}

/// What `bytes` of `volume` take from its group, as an agent charges it.
fn charge(volume: &Volume, bytes: u64) -> u64 {
    volume.thin.map_or(bytes, |ratio| ratio.charge(bytes))
}

impl Store for MemoryStore {
    async fn get(&self, id: &VolumeId) -> Result<Option<Volume>, StoreError> {
        Ok(self.volumes.lock().unwrap().get(id).cloned())
    }

    async fn create(&self, new: NewVolume) -> Result<Volume, StoreError> {
        {
            let mut volumes = self.volumes.lock().unwrap();
            volumes.entry(new.id.clone()).or_insert_with(|| Volume {
                id: new.id.clone(),
                node: new.node,
                media: new.media,
                access: new.access,
                size_bytes: new.size_bytes,
                state: VolumeState::Pending,
                actual_bytes: None,
                generation: 1,
                condition: None,
                io_limits: new.io_limits,
                thin: new.thin,
                created_seconds: Some(1_700_000_000),
                snapshot_of: new.snapshot_of.map(|(source, _)| source),
                source: new.source,
            });
        }
        let stored = self.volumes.lock().unwrap()[&new.id].clone();
        // The agent acts after the store answers, as a real one would.
        Ok(stored)
    }

    async fn wait(&self, volume: &Volume, deadline: Instant) -> Result<Volume, StoreError> {
        self.act(&volume.id);
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(current) = self.volumes.lock().unwrap().get(&volume.id)
                && current.generation >= volume.generation
                && current.settled()
            {
                return Ok(current.clone());
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(StoreError::Timeout {
                    id: volume.id.clone(),
                    waited: Duration::ZERO,
                });
            }
        }
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), StoreError> {
        self.volumes.lock().unwrap().remove(id);
        Ok(())
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StoreError> {
        let mut volumes = self.volumes.lock().unwrap();
        let stored = volumes
            .get_mut(&volume.id)
            .expect("resize of a known volume");
        stored.size_bytes = size_bytes;
        stored.generation += 1;
        // As LogicalVolume status reads: a failure answered the request
        // before this one.
        if matches!(stored.state, VolumeState::Failed { .. }) {
            stored.state = VolumeState::Pending;
        }
        Ok(stored.clone())
    }

    async fn modify(&self, volume: &Volume, io_limits: IoLimits) -> Result<Volume, StoreError> {
        let mut volumes = self.volumes.lock().unwrap();
        let stored = volumes
            .get_mut(&volume.id)
            .expect("modify of a known volume");
        stored.io_limits = io_limits;
        stored.generation += 1;
        Ok(stored.clone())
    }

    async fn list(
        &self,
        after: Option<&VolumeId>,
        limit: usize,
        snapshots: bool,
    ) -> Result<Vec<Volume>, StoreError> {
        let volumes = self.volumes.lock().unwrap();
        Ok(volumes
            .values()
            .filter(|v| v.snapshot_of.is_some() == snapshots)
            .filter(|v| after.is_none_or(|after| &v.id > after))
            .filter(|v| v.state != VolumeState::Deleting)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn capacities(&self, media: MediaClass) -> Result<Vec<NodeCapacity>, StoreError> {
        let volumes = self.volumes.lock().unwrap();
        Ok(self
            .groups
            .iter()
            .filter(|g| g.media == media)
            .map(|g| {
                let allocated: u64 = volumes
                    .values()
                    .filter(|v| v.node == g.node && v.media == media)
                    .map(|v| charge(v, v.size_bytes))
                    .sum();
                NodeCapacity {
                    node: g.node.to_owned(),
                    total_bytes: g.total_bytes,
                    reported_free_bytes: g.total_bytes,
                    allocated_bytes: allocated,
                    unaccounted_bytes: 0,
                    thin_free_bytes: 0,
                    extent_bytes: EXTENT,
                    degraded: false,
                    silent: None,
                }
            })
            .collect())
    }
}
