//! Space promised to pods the extender approved but whose volumes the cluster
//! does not show yet.
//!
//! kube-scheduler calls `filter` with every candidate node and then puts the
//! pod on one of the approved ones, which the extender learns only when the
//! pod's claims get `volume.kubernetes.io/selected-node`. Until then the pod
//! could land on any approved node, so its reservation counts on each of them
//! (once per node, however often the pod is filtered), and `prioritize`
//! narrows it to the nodes kube-scheduler still considers. Reserving only on
//! the best-scoring node would be unsound: kube-scheduler adds other plugins'
//! scores, and skips `prioritize` when a single node is feasible.
//!
//! A reserved claim stops counting as soon as the cluster accounts for it
//! itself: when it gets a selected node (it then counts on that node as being
//! provisioned), a `LogicalVolume`, or is bound. The first of these also
//! narrows the rest of the pod's reservation to that node. A reservation
//! whose pod never shows up is dropped after its time to live.
//!
//! What a caller can reserve is bounded, whoever it is: a claim counts in
//! one reservation only (the latest pod's: two pods of one claim land on the
//! same node anyway), so reserved bytes never exceed what pending claims ask
//! for on the nodes that could hold them; and the number of reservations is
//! capped, the one closest to expiry giving way.

use std::time::Instant;

use foldhash::HashMap;
use lvmlocal_proto::MediaClass;

use crate::capacity::PerMedia;
use crate::needs::ClaimKey;

/// Index of a node in the inventory.
pub type NodeId = u32;

/// A pod's promise: its unaccounted claims, on the nodes it may land on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// `namespace/name`, for logs.
    pub pod: Box<str>,
    pub nodes: Vec<NodeId>,
    pub claims: Vec<ReservedClaim>,
    pub expires: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedClaim {
    pub key: ClaimKey,
    pub media: MediaClass,
    pub bytes: u64,
}

impl Reservation {
    fn load(&self) -> PerMedia<u64> {
        let mut load = PerMedia::default();
        for claim in &self.claims {
            load[claim.media] += claim.bytes;
        }
        load
    }
}

/// How many reservations are kept unless configured otherwise: far more pods
/// than one kube-scheduler places within a reservation's lifetime.
pub const DEFAULT_LIMIT: usize = 10_000;

/// All live reservations, keyed by pod UID, with their sum per node.
#[derive(Debug)]
pub struct Reservations {
    by_pod: HashMap<Box<str>, Reservation>,
    /// Which pod reserved a claim: the latest to ask for it.
    by_claim: HashMap<ClaimKey, Box<str>>,
    /// Indexed by node id.
    reserved: Vec<PerMedia<u64>>,
    limit: usize,
}

impl Default for Reservations {
    fn default() -> Self {
        Self::with_limit(DEFAULT_LIMIT)
    }
}

impl Reservations {
    /// Keeps at most `limit` reservations (at least one).
    pub fn with_limit(limit: usize) -> Self {
        Reservations {
            by_pod: HashMap::default(),
            by_claim: HashMap::default(),
            reserved: Vec::new(),
            limit: limit.max(1),
        }
    }

    /// Whether any reservation still refers to `node`: every one kept
    /// reserves some bytes on each of its nodes.
    pub fn refers_to(&self, node: NodeId) -> bool {
        self.on(node) != PerMedia::default()
    }

    /// Bytes reserved per class on `node`.
    pub fn on(&self, node: NodeId) -> PerMedia<u64> {
        self.reserved
            .get(node as usize)
            .copied()
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.by_pod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pod.is_empty()
    }

    pub fn get(&self, pod_uid: &str) -> Option<&Reservation> {
        self.by_pod.get(pod_uid)
    }

    /// Records `reservation` for `pod_uid`, replacing the pod's previous one
    /// and taking its claims out of other pods' reservations.
    pub fn reserve(&mut self, pod_uid: &str, reservation: Reservation) {
        self.release(pod_uid);
        if reservation.nodes.is_empty() || reservation.claims.iter().all(|claim| claim.bytes == 0) {
            return;
        }
        for claim in &reservation.claims {
            self.settle(&claim.key, None);
        }
        if self.by_pod.len() >= self.limit {
            self.evict();
        }
        self.add(&reservation.nodes, reservation.load());
        for claim in &reservation.claims {
            self.by_claim.insert(claim.key.clone(), pod_uid.into());
        }
        self.by_pod.insert(pod_uid.into(), reservation);
    }

    /// Drops the pod's reservation and returns it.
    pub fn release(&mut self, pod_uid: &str) -> Option<Reservation> {
        let reservation = self.by_pod.remove(pod_uid)?;
        self.subtract(&reservation.nodes, reservation.load());
        for claim in &reservation.claims {
            if self
                .by_claim
                .get(&claim.key)
                .is_some_and(|uid| &**uid == pod_uid)
            {
                self.by_claim.remove(&claim.key);
            }
        }
        Some(reservation)
    }

    /// The cluster now accounts for `claim` by itself; `placed_on` is the node
    /// its pod went to, when known.
    pub fn settle(&mut self, claim: &ClaimKey, placed_on: Option<NodeId>) {
        let Some(pod_uid) = self.by_claim.remove(claim) else {
            return;
        };
        let Some(mut reservation) = self.release(&pod_uid) else {
            return;
        };
        reservation.claims.retain(|reserved| reserved.key != *claim);
        if let Some(node) = placed_on {
            reservation.nodes = vec![node];
        }
        self.reserve(&pod_uid, reservation);
    }

    /// Drops the reservations that expire at or before `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<Box<str>> = self
            .by_pod
            .iter()
            .filter(|(_, reservation)| reservation.expires <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in &expired {
            if let Some(reservation) = self.release(uid) {
                tracing::debug!(pod = %reservation.pod, "reservation expired");
            }
        }
        expired.len()
    }

    /// Makes room for one more: drops the reservation closest to expiry.
    fn evict(&mut self) {
        let Some(uid) = self
            .by_pod
            .iter()
            .min_by_key(|(_, reservation)| reservation.expires)
            .map(|(uid, _)| uid.clone())
        else {
            return;
        };
        if let Some(reservation) = self.release(&uid) {
            tracing::warn!(
                pod = %reservation.pod,
                limit = self.limit,
                "too many reservations: the one closest to expiry is dropped"
            );
        }
    }

    fn add(&mut self, nodes: &[NodeId], load: PerMedia<u64>) {
        for &node in nodes {
            let index = node as usize;
            if index >= self.reserved.len() {
                self.reserved.resize(index + 1, PerMedia::default());
            }
            for media in MediaClass::ALL {
                self.reserved[index][media] += load[media];
            }
        }
    }

    fn subtract(&mut self, nodes: &[NodeId], load: PerMedia<u64>) {
        for &node in nodes {
            let sums = &mut self.reserved[node as usize];
            for media in MediaClass::ALL {
                sums[media] -= load[media];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use MediaClass::*;

    fn claim(name: &str, media: MediaClass, bytes: u64) -> ReservedClaim {
        ReservedClaim {
            key: ClaimKey::new("db", name),
            media,
            bytes,
        }
    }

    fn reservation(nodes: &[NodeId], claims: Vec<ReservedClaim>, expires: Instant) -> Reservation {
        Reservation {
            pod: "db/p".into(),
            nodes: nodes.to_vec(),
            claims,
            expires,
        }
    }

    #[test]
    fn counts_once_per_node_however_often_the_pod_is_filtered() {
        let later = Instant::now() + Duration::from_secs(30);
        let mut book = Reservations::default();
        for _ in 0..3 {
            book.reserve(
                "uid-1",
                reservation(
                    &[0, 2],
                    vec![claim("a", Nvme, 10), claim("b", Hdd, 5)],
                    later,
                ),
            );
        }
        assert_eq!(book.on(0), PerMedia([10, 0, 5]));
        assert_eq!(book.on(1), PerMedia::default());
        assert_eq!(book.on(2), PerMedia([10, 0, 5]));
        assert_eq!(book.on(7), PerMedia::default());
        book.reserve("uid-2", reservation(&[2], vec![claim("c", Nvme, 1)], later));
        assert_eq!(book.on(2), PerMedia([11, 0, 5]));
        assert_eq!(book.len(), 2);
    }

    #[test]
    fn settling_a_claim_narrows_to_the_chosen_node() {
        let later = Instant::now() + Duration::from_secs(30);
        let mut book = Reservations::default();
        book.reserve(
            "uid-1",
            reservation(
                &[0, 1, 2],
                vec![claim("a", Nvme, 10), claim("b", Nvme, 5)],
                later,
            ),
        );
        book.settle(&ClaimKey::new("db", "a"), Some(1));
        assert_eq!(book.on(0), PerMedia::default());
        assert_eq!(book.on(1), PerMedia([5, 0, 0]));
        assert_eq!(book.on(2), PerMedia::default());
        book.settle(&ClaimKey::new("db", "b"), None);
        assert!(book.is_empty());
        assert_eq!(book.on(1), PerMedia::default());
        // Claims nobody reserved change nothing.
        book.settle(&ClaimKey::new("db", "z"), Some(0));
        assert!(book.is_empty());
    }

    #[test]
    fn expiry_and_release() {
        let now = Instant::now();
        let mut book = Reservations::default();
        book.reserve("old", reservation(&[0], vec![claim("a", Ssd, 3)], now));
        book.reserve(
            "new",
            reservation(&[0], vec![claim("b", Ssd, 4)], now + Duration::from_secs(1)),
        );
        assert_eq!(book.expire(now), 1);
        assert_eq!(book.on(0), PerMedia([0, 4, 0]));
        assert!(book.get("old").is_none());
        let released = book.release("new").unwrap();
        assert_eq!(released.claims, vec![claim("b", Ssd, 4)]);
        assert_eq!(book.on(0), PerMedia::default());
        assert!(book.release("new").is_none());
    }

    #[test]
    fn a_claim_counts_in_one_reservation_only() {
        let later = Instant::now() + Duration::from_secs(30);
        let mut book = Reservations::default();
        book.reserve(
            "uid-1",
            reservation(
                &[0, 1],
                vec![claim("a", Nvme, 10), claim("b", Nvme, 5)],
                later,
            ),
        );
        // Forged or real, a second pod naming claim a takes it over.
        for uid in ["uid-2", "uid-3", "uid-4"] {
            book.reserve(uid, reservation(&[0, 1], vec![claim("a", Nvme, 10)], later));
        }
        assert_eq!(book.on(0), PerMedia([15, 0, 0]));
        assert_eq!(book.on(1), PerMedia([15, 0, 0]));
        assert_eq!(book.len(), 2, "uid-1 keeps b, uid-4 holds a");
        assert_eq!(book.get("uid-1").unwrap().claims, vec![claim("b", Nvme, 5)]);
        assert!(book.get("uid-4").is_some());
    }

    #[test]
    fn past_the_limit_the_reservation_closest_to_expiry_goes() {
        let now = Instant::now();
        let mut book = Reservations::with_limit(3);
        for i in 0..5u64 {
            let expires = now + Duration::from_secs(60 - i);
            let name = format!("c{i}");
            book.reserve(
                &format!("uid-{i}"),
                reservation(&[0], vec![claim(&name, Hdd, 1)], expires),
            );
        }
        assert_eq!(book.len(), 3);
        // Each later one expires sooner: uid-3 pushed out uid-2, and uid-4
        // pushed out uid-3.
        assert!(book.get("uid-0").is_some() && book.get("uid-1").is_some());
        assert!(book.get("uid-4").is_some());
        assert_eq!(book.on(0), PerMedia([0, 0, 3]));
        assert!(book.refers_to(0));
        assert!(!book.refers_to(1));
    }

    #[test]
    fn empty_reservations_are_not_kept() {
        let later = Instant::now() + Duration::from_secs(30);
        let mut book = Reservations::default();
        book.reserve("uid-1", reservation(&[], vec![claim("a", Nvme, 1)], later));
        book.reserve("uid-2", reservation(&[3], vec![], later));
        book.reserve("uid-3", reservation(&[3], vec![claim("b", Ssd, 0)], later));
        assert!(book.is_empty());
    }
}
