//! The extender's view of the cluster, fed by watch events: the volume groups
//! of each node, the space its `LogicalVolume`s take, the claims being
//! provisioned, the StorageClasses, the agents' heartbeats, and the
//! reservations.
//!
//! Free space of a class on a node = the volume group's `totalBytes` − the
//! sizes of the `LogicalVolume`s placed there − the claims kube-scheduler has
//! sent there that have no `LogicalVolume` yet − reservations − what the
//! agent reports no `LogicalVolume` accounts for (`unaccountedBytes`: LVs
//! made by hand, orphans). The agent's own
//! `freeBytes` is not used: it lags behind every volume created since its last
//! report, and would count those volumes twice once they show up here.
//!
//! Only what that arithmetic needs is kept, a few dozen bytes per object, so
//! that 100,000 volumes and claims fit in a few tens of megabytes; a store of
//! whole objects would take several times the memory budget.

use std::borrow::Borrow;
use std::hash::Hash;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{LogicalVolume, NodeLocalStorage};
use lvmlocal_proto::heartbeat::{self, Beat, Silence};

use crate::capacity::{MediaCapacity, NodeCapacity, PerMedia, Refusal, Verdict, fit};
use crate::needs::{Catalog, ClaimKey, ClaimState, ClassKind, ClassRecord, Origin, PodNeeds};
use crate::reservation::{NodeId, Reservation, Reservations, ReservedClaim};

/// A pod being placed: its UID keys its reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub uid: String,
    /// `namespace/name`.
    pub name: String,
}

impl PodRef {
    /// Pods always have a UID in the API; a request without one is keyed by
    /// name so that repeated calls still replace each other's reservation.
    pub fn of(pod: &Pod) -> Self {
        let name = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let uid = pod
            .metadata
            .uid
            .clone()
            .filter(|uid| !uid.is_empty())
            .unwrap_or_else(|| name.clone());
        PodRef { uid, name }
    }
}

/// The five kinds of object the inventory mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    NodeLocalStorage,
    LogicalVolume,
    PersistentVolumeClaim,
    StorageClass,
    /// The agents' heartbeat Leases.
    Lease,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::NodeLocalStorage,
        Source::LogicalVolume,
        Source::PersistentVolumeClaim,
        Source::StorageClass,
        Source::Lease,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Source::NodeLocalStorage => "nodelocalstorages",
            Source::LogicalVolume => "logicalvolumes",
            Source::PersistentVolumeClaim => "persistentvolumeclaims",
            Source::StorageClass => "storageclasses",
            Source::Lease => "leases",
        }
    }
}

#[derive(Debug)]
struct NodeRecord {
    name: Box<str>,
    /// From the node's `NodeLocalStorage`; `None` while it has none.
    storage: Option<PerMedia<Option<GroupRecord>>>,
    /// Listing generation that last saw the `NodeLocalStorage`.
    seen: u32,
    /// Bytes of the `LogicalVolume`s on the node.
    placed: PerMedia<u64>,
    /// Bytes of claims sent to the node whose volume does not exist yet.
    in_flight: PerMedia<u64>,
    /// The agent's heartbeat; `None` while the node has no heartbeat Lease.
    beat: Option<Beat>,
    /// How many `LogicalVolume`s name the node.
    volumes: u32,
}

impl NodeRecord {
    fn new(name: &str) -> Self {
        NodeRecord {
            name: name.into(),
            storage: None,
            seen: 0,
            placed: PerMedia::default(),
            in_flight: PerMedia::default(),
            beat: None,
            volumes: 0,
        }
    }

    /// Nothing refers to the node but its name: it can be forgotten.
    fn idle(&self) -> bool {
        self.storage.is_none()
            && self.beat.is_none()
            && self.volumes == 0
            && self.in_flight == PerMedia::default()
    }
}

#[derive(Debug)]
struct GroupRecord {
    vg_name: Box<str>,
    total_bytes: u64,
    /// What the agent reports no `LogicalVolume` accounts for.
    unaccounted_bytes: u64,
    extent_bytes: u64,
    degraded: bool,
    load_percent: u32,
}

#[derive(Debug)]
struct VolumeRecord {
    node: NodeId,
    media: MediaClass,
    bytes: u64,
    claim: Option<ClaimKey>,
    /// A snapshot's VolumeSnapshot.
    snapshot: Option<ClaimKey>,
}

/// Objects of one kind by key, with what a relist needs to drop the ones
/// that are gone: each row remembers the listing generation that last saw it.
#[derive(Debug)]
struct Table<K, V> {
    rows: HashMap<K, (V, u32)>,
    generation: u32,
    synced: bool,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            rows: HashMap::default(),
            generation: 0,
            synced: false,
        }
    }
}

impl<K: Eq + Hash, V> Table<K, V> {
    fn get<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.rows.get(key).map(|(value, _)| value)
    }

    fn upsert(&mut self, key: K, value: V) -> Option<V> {
        self.rows
            .insert(key, (value, self.generation))
            .map(|(old, _)| old)
    }

    fn remove<Q: Eq + Hash + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.rows.remove(key).map(|(old, _)| old)
    }

    fn relist(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Ends a relist: removes and returns the rows it did not see.
    fn sweep(&mut self) -> Vec<(K, V)> {
        self.synced = true;
        let generation = self.generation;
        self.rows
            .extract_if(|_, (_, seen)| *seen != generation)
            .map(|(key, (value, _))| (key, value))
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct Inventory {
    node_ids: HashMap<Box<str>, NodeId>,
    /// Indexed by node id. A node nothing refers to any more (its storage,
    /// Lease and volumes gone, no reservation on it) is forgotten and its
    /// id reused, so a cluster that replaces its nodes does not grow this.
    nodes: Vec<NodeRecord>,
    free_ids: Vec<NodeId>,
    storage_generation: u32,
    storage_synced: bool,
    volumes: Table<Box<str>, VolumeRecord>,
    claims: Table<ClaimKey, ClaimState>,
    classes: Table<Box<str>, ClassRecord>,
    /// Heartbeat Leases by name, with the node each speaks for: a Lease that
    /// leaves the label selector is deleted without the label, so its node
    /// cannot be read from it then.
    leases: Table<Box<str>, NodeId>,
    /// Claims that have a `LogicalVolume`, with how many.
    with_volume: HashMap<ClaimKey, u32>,
    /// The node of each claim's volume and each VolumeSnapshot's snapshot:
    /// where a copy of it must go.
    origins: HashMap<Origin, NodeId>,
    /// Pending claims that carry a selected node.
    selected: HashSet<ClaimKey>,
    /// What `selected` adds to the nodes' `in_flight`, to undo on recount.
    in_flight: Vec<(NodeId, MediaClass, u64)>,
    reservations: Reservations,
}

impl Inventory {
    /// The kinds whose first listing has not completed; decisions made before
    /// then would rest on a partial view.
    pub fn unsynced(&self) -> Vec<Source> {
        Source::ALL
            .into_iter()
            .filter(|source| match source {
                Source::NodeLocalStorage => !self.storage_synced,
                Source::LogicalVolume => !self.volumes.synced,
                Source::PersistentVolumeClaim => !self.claims.synced,
                Source::StorageClass => !self.classes.synced,
                Source::Lease => !self.leases.synced,
            })
            .collect()
    }

    pub fn reservations(&self) -> &Reservations {
        &self.reservations
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.node_ids.get(name).copied()
    }

    /// An inventory that keeps at most `limit` reservations.
    pub fn with_reservation_limit(limit: usize) -> Self {
        Inventory {
            reservations: Reservations::with_limit(limit),
            ..Inventory::default()
        }
    }

    /// How many nodes the inventory remembers.
    pub fn nodes(&self) -> usize {
        self.node_ids.len()
    }

    fn intern(&mut self, name: &str) -> NodeId {
        if let Some(&id) = self.node_ids.get(name) {
            return id;
        }
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.nodes[id as usize] = NodeRecord::new(name);
                id
            }
            None => {
                self.nodes.push(NodeRecord::new(name));
                NodeId::try_from(self.nodes.len() - 1).expect("fewer than 2^32 nodes")
            }
        };
        self.node_ids.insert(name.into(), id);
        id
    }

    /// Forgets the nodes nothing refers to any more.
    fn forget_idle_nodes(&mut self) {
        let idle: Vec<NodeId> = self
            .node_ids
            .values()
            .copied()
            .filter(|&id| self.nodes[id as usize].idle() && !self.reservations.refers_to(id))
            .collect();
        for id in idle {
            let record = &mut self.nodes[id as usize];
            self.node_ids.remove(&record.name);
            record.name = Box::from("");
            self.free_ids.push(id);
        }
    }

    pub fn apply_storage(&mut self, event: Event<NodeLocalStorage>) {
        match event {
            Event::Init => self.storage_generation = self.storage_generation.wrapping_add(1),
            Event::Apply(nls) | Event::InitApply(nls) => {
                let groups = PerMedia(MediaClass::ALL.map(|media| {
                    let report = nls.status.as_ref()?;
                    let status = report.media(media)?;
                    Some(GroupRecord {
                        vg_name: status.vg_name.as_str().into(),
                        total_bytes: status.total_bytes,
                        unaccounted_bytes: report.unaccounted(media),
                        extent_bytes: status.extent_bytes,
                        degraded: status.degraded,
                        load_percent: report.load_percent(media),
                    })
                }));
                let id = self.intern(&nls.name_any());
                let node = &mut self.nodes[id as usize];
                node.storage = Some(groups);
                node.seen = self.storage_generation;
            }
            Event::Delete(nls) => {
                if let Some(id) = self.node_id(&nls.name_any()) {
                    self.nodes[id as usize].storage = None;
                }
            }
            Event::InitDone => {
                let generation = self.storage_generation;
                for node in &mut self.nodes {
                    if node.seen != generation {
                        node.storage = None;
                    }
                }
                self.storage_synced = true;
            }
        }
    }

    pub fn apply_volume(&mut self, event: Event<LogicalVolume>) {
        match event {
            Event::Init => self.volumes.relist(),
            Event::Apply(lv) | Event::InitApply(lv) => {
                let record = VolumeRecord {
                    node: self.intern(&lv.spec.node_name),
                    media: lv.spec.media,
                    bytes: lv.charged_bytes(),
                    claim: lv
                        .spec
                        .pvc
                        .as_ref()
                        .map(|pvc| ClaimKey::new(&pvc.namespace, &pvc.name)),
                    snapshot: lv
                        .spec
                        .snapshot
                        .as_ref()
                        .and_then(|snapshot| snapshot.volume_snapshot.as_ref())
                        .map(|of| ClaimKey::new(&of.namespace, &of.name)),
                };
                let origins: Vec<Origin> = Self::origins_of(&record).collect();
                self.place(&record);
                if let Some(old) = self.volumes.upsert(lv.name_any().into(), record) {
                    self.unplace(&old);
                }
                // After the old record's are dropped: an update keeps them.
                let node = self.volumes.get(lv.name_any().as_str()).map(|r| r.node);
                for origin in origins {
                    if let Some(node) = node {
                        self.origins.insert(origin, node);
                    }
                }
            }
            Event::Delete(lv) => {
                if let Some(old) = self.volumes.remove(lv.name_any().as_str()) {
                    self.unplace(&old);
                }
            }
            Event::InitDone => {
                for (_, gone) in self.volumes.sweep() {
                    self.unplace(&gone);
                }
            }
        }
    }

    fn origins_of(volume: &VolumeRecord) -> impl Iterator<Item = Origin> + '_ {
        let claim = volume.claim.iter().cloned().map(Origin::Claim);
        claim.chain(volume.snapshot.iter().cloned().map(Origin::Snapshot))
    }

    fn place(&mut self, volume: &VolumeRecord) {
        let node = &mut self.nodes[volume.node as usize];
        node.placed[volume.media] += volume.bytes;
        node.volumes += 1;
        if let Some(claim) = &volume.claim {
            let count = self.with_volume.entry(claim.clone()).or_default();
            *count += 1;
            if *count == 1 {
                self.reservations.settle(claim, Some(volume.node));
                if self.selected.contains(claim) {
                    self.recount_in_flight();
                }
            }
        }
    }

    fn unplace(&mut self, volume: &VolumeRecord) {
        for origin in Self::origins_of(volume) {
            if self.origins.get(&origin) == Some(&volume.node) {
                self.origins.remove(&origin);
            }
        }
        let node = &mut self.nodes[volume.node as usize];
        node.placed[volume.media] -= volume.bytes;
        node.volumes -= 1;
        if let Some(claim) = &volume.claim
            && let Some(count) = self.with_volume.get_mut(claim)
        {
            *count -= 1;
            if *count == 0 {
                self.with_volume.remove(claim);
                if self.selected.contains(claim) {
                    self.recount_in_flight();
                }
            }
        }
    }

    pub fn apply_claim(&mut self, event: Event<PersistentVolumeClaim>) {
        match event {
            Event::Init => self.claims.relist(),
            Event::Apply(pvc) | Event::InitApply(pvc) => {
                let key = ClaimKey::of(&pvc);
                let state = ClaimState::of(&pvc);
                let selected_node = match &state {
                    ClaimState::Pending(pending) => pending.selected_node.clone(),
                    ClaimState::Bound => None,
                };
                let bound = state == ClaimState::Bound;
                self.claims.upsert(key.clone(), state);
                // A claim in flight may have changed size or node, or left.
                let in_flight_changed = if selected_node.is_some() {
                    self.selected.insert(key.clone());
                    true
                } else {
                    self.selected.remove(&key)
                };
                if in_flight_changed {
                    self.recount_in_flight();
                }
                if let Some(node) = selected_node {
                    let node = self.intern(&node);
                    self.reservations.settle(&key, Some(node));
                } else if bound {
                    self.reservations.settle(&key, None);
                }
            }
            Event::Delete(pvc) => {
                let key = ClaimKey::of(&pvc);
                self.claims.remove(&key);
                self.forget_claim(&key);
            }
            Event::InitDone => {
                for (key, _) in self.claims.sweep() {
                    self.forget_claim(&key);
                }
            }
        }
    }

    fn forget_claim(&mut self, key: &ClaimKey) {
        if self.selected.remove(key) {
            self.recount_in_flight();
        }
        self.reservations.settle(key, None);
    }

    pub fn apply_class(&mut self, event: Event<StorageClass>) {
        match event {
            Event::Init => self.classes.relist(),
            Event::Apply(class) | Event::InitApply(class) => {
                self.classes
                    .upsert(class.name_any().into(), ClassRecord::of(&class));
            }
            Event::Delete(class) => {
                self.classes.remove(class.name_any().as_str());
            }
            Event::InitDone => {
                self.classes.sweep();
            }
        }
        // Whether a claim in flight is lvmlocal's, and of which class,
        // depends on its StorageClass.
        if !self.selected.is_empty() {
            self.recount_in_flight();
        }
    }

    /// Applies a heartbeat Lease event seen at `now`, the reader's clock the
    /// heartbeat is judged on.
    pub fn apply_lease(&mut self, event: Event<Lease>, now: Instant) {
        match event {
            Event::Init => self.leases.relist(),
            Event::Apply(lease) | Event::InitApply(lease) => {
                let name = lease.name_any();
                let Some(node) = heartbeat::node_of(&lease) else {
                    // No longer speaks for a node: as if deleted.
                    self.forget_lease(&name);
                    return;
                };
                let id = self.intern(node);
                let record = &mut self.nodes[id as usize];
                record.beat = Some(Beat::observe(record.beat.as_ref(), &lease, now));
                if let Some(old) = self.leases.upsert(name.into(), id)
                    && old != id
                {
                    self.nodes[old as usize].beat = None;
                }
            }
            Event::Delete(lease) => self.forget_lease(&lease.name_any()),
            Event::InitDone => {
                for (_, gone) in self.leases.sweep() {
                    self.nodes[gone as usize].beat = None;
                }
            }
        }
    }

    fn forget_lease(&mut self, name: &str) {
        if let Some(id) = self.leases.remove(name) {
            self.nodes[id as usize].beat = None;
        }
    }

    /// Why the agent of a node with lvmlocal storage counts as silent at
    /// `now`, if it does; a node without storage has no agent to hear from.
    fn silence(&self, id: NodeId, now: Instant) -> Option<Silence> {
        let node = &self.nodes[id as usize];
        node.storage.as_ref()?;
        heartbeat::silence(node.beat.as_ref(), now)
    }

    /// Recomputes what claims in flight add to their nodes. There are only
    /// as many as pods kube-scheduler has just placed, so this is cheap.
    fn recount_in_flight(&mut self) {
        for (node, media, bytes) in self.in_flight.drain(..) {
            self.nodes[node as usize].in_flight[media] -= bytes;
        }
        let mut in_flight = Vec::new();
        for key in &self.selected {
            if self.with_volume.contains_key(key) {
                continue;
            }
            let Some(ClaimState::Pending(pending)) = self.claims.get(key) else {
                continue;
            };
            let (Some(node), Some(bytes)) = (&pending.selected_node, pending.bytes) else {
                continue;
            };
            let class = pending
                .storage_class
                .as_deref()
                .and_then(|name| self.classes.get(name));
            if let Some(ClassRecord {
                kind: ClassKind::Lvmlocal { media, thin, .. },
                ..
            }) = class
            {
                let bytes = thin.map_or(bytes, |ratio| ratio.charge(bytes));
                in_flight.push((node.clone(), *media, bytes));
            }
        }
        for (node, media, bytes) in in_flight {
            let id = self.intern(&node);
            self.nodes[id as usize].in_flight[media] += bytes;
            self.in_flight.push((id, media, bytes));
        }
    }

    /// The node's volume groups with what is used of each, not counting
    /// `pod`'s own claims already sent to this node.
    fn capacity(&self, id: NodeId, needs: &PodNeeds, pinned: bool) -> Option<NodeCapacity<'_>> {
        let node = &self.nodes[id as usize];
        let storage = node.storage.as_ref()?;
        let reserved = self.reservations.on(id);
        let group = |media: MediaClass| {
            let group = storage[media].as_ref()?;
            let own: u64 = if pinned {
                needs
                    .claims
                    .iter()
                    .filter(|claim| {
                        claim.media == media && claim.selected_node.as_deref() == Some(&*node.name)
                    })
                    .map(|claim| claim.bytes)
                    .sum()
            } else {
                0
            };
            let used = node.placed[media]
                + node.in_flight[media]
                + reserved[media]
                + group.unaccounted_bytes;
            Some(MediaCapacity {
                vg_name: &group.vg_name,
                total_bytes: group.total_bytes,
                used_bytes: used.saturating_sub(own),
                extent_bytes: group.extent_bytes,
                degraded: group.degraded,
                load_percent: group.load_percent,
            })
        };
        Some(PerMedia([
            group(MediaClass::Nvme),
            group(MediaClass::Ssd),
            group(MediaClass::Hdd),
        ]))
    }

    /// Judges each candidate node for `pod` and reserves space on every node
    /// that fits, replacing the pod's previous reservation. Atomic under the
    /// caller's lock, so concurrent pods never both take the last space.
    pub fn assess(
        &mut self,
        pod: &PodRef,
        needs: &PodNeeds,
        candidates: &[&str],
        now: Instant,
        ttl: Duration,
    ) -> Vec<Verdict> {
        self.reservations.expire(now);
        // The pod's earlier reservation must not count against itself.
        self.reservations.release(&pod.uid);
        let pinned = needs
            .claims
            .iter()
            .any(|claim| claim.selected_node.is_some());
        // Resolving every name first, then judging every node, keeps each
        // loop small enough for the processor to overlap their cache misses.
        let ids: Vec<Option<NodeId>> = candidates.iter().map(|name| self.node_id(name)).collect();
        let mut approved = Vec::new();
        let verdicts = ids
            .iter()
            .map(|id| {
                let Some(id) = *id else {
                    return Verdict::Refused(vec![Refusal::NoStorage]);
                };
                let name = &self.nodes[id as usize].name;
                if let Some(claim) = needs.claims.iter().find(|claim| {
                    claim
                        .origin_node
                        .as_deref()
                        .is_some_and(|node| node != &**name)
                }) {
                    return Verdict::Refused(vec![Refusal::SourceElsewhere {
                        claim: claim.key.to_string(),
                        node: claim.origin_node.as_deref().unwrap_or_default().to_owned(),
                    }]);
                }
                let mut verdict = fit(&needs.claims, self.capacity(id, needs, pinned).as_ref());
                // What a silent agent reported may be stale, and it would
                // not create the volume anyway.
                if let Some(silence) = self.silence(id, now) {
                    verdict = verdict.also_refused(Refusal::AgentSilent(silence));
                }
                if verdict.fits() {
                    approved.push(id);
                }
                verdict
            })
            .collect();
        approved.sort_unstable();
        approved.dedup();
        // Claims already sent to a node count there as in flight.
        let claims = needs
            .claims
            .iter()
            .filter(|claim| claim.selected_node.is_none())
            .map(|claim| ReservedClaim {
                key: claim.key.clone(),
                media: claim.media,
                bytes: claim.bytes,
            })
            .collect();
        self.reservations.reserve(
            &pod.uid,
            Reservation {
                pod: pod.name.as_str().into(),
                nodes: approved,
                claims,
                expires: now + ttl,
            },
        );
        verdicts
    }

    /// Drops expired reservations and forgets the nodes nothing refers to
    /// any more; returns how many reservations remain.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.reservations.expire(now);
        self.forget_idle_nodes();
        self.reservations.len()
    }
}

impl Catalog for Inventory {
    fn claim(&self, key: &ClaimKey) -> Option<&ClaimState> {
        self.claims.get(key)
    }

    fn class(&self, name: &str) -> Option<&ClassRecord> {
        self.classes.get(name)
    }

    /// With several classes marked default (a misconfiguration), the first by
    /// name, so the answer does not change from call to call.
    fn default_class(&self) -> Option<&str> {
        self.classes
            .rows
            .iter()
            .filter(|(_, (class, _))| class.default)
            .map(|(name, _)| &**name)
            .min()
    }

    fn origin_node(&self, origin: &Origin) -> Option<&str> {
        let id = self.origins.get(origin)?;
        Some(&self.nodes[*id as usize].name)
    }
}
