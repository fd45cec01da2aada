//! The two extender verbs over the inventory: `filter` keeps the candidate
//! nodes that can hold all of a pod's pending lvmlocal claims, `prioritize`
//! ranks them. Both reserve space for the pod on the nodes they approve.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::List;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::runtime::watcher::Event;
use lvmlocal_proto::extender::{
    ExtenderArgs, ExtenderFilterResult, FailedNodesMap, HostPriority, HostPriorityList,
    MIN_EXTENDER_PRIORITY, NodeName,
};
use lvmlocal_proto::params::Placement;

use crate::capacity::{Fit, Refusal, Verdict, explain};
use crate::inventory::{Inventory, PodRef, Source};
use crate::metrics::Metrics;
use crate::needs::{Catalog, ClaimKey, NeedsError, PodNeeds};
use crate::placement::{ScoreGroup, scores};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// For claims whose StorageClass does not set `lvmlocal.io/placement`.
    pub default_placement: Placement,
    /// How long a reservation lives if the pod's claims never show up.
    pub reservation_ttl: Duration,
    /// How many reservations are kept at most.
    pub max_reservations: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtenderError {
    #[error("the request has no Pod")]
    NoPod,
    #[error("the request has neither Nodes nor NodeNames")]
    NoCandidates,
    #[error("waiting for the first listing of {}", .0.join(", "))]
    NotSynced(Vec<&'static str>),
    #[error(transparent)]
    Needs(#[from] NeedsError),
}

impl ExtenderError {
    /// Whether retrying the pod cannot help until someone changes a claim
    /// or a class.
    fn is_unresolvable(&self) -> bool {
        matches!(
            self,
            ExtenderError::Needs(NeedsError::NoSize(_) | NeedsError::InvalidClass { .. })
        )
    }

    /// A bounded label for metrics.
    fn kind(&self) -> &'static str {
        match self {
            ExtenderError::NoPod | ExtenderError::NoCandidates => "bad_request",
            ExtenderError::NotSynced(_) => "not_synced",
            ExtenderError::Needs(NeedsError::ClaimNotCached(_)) => "claim_not_cached",
            ExtenderError::Needs(NeedsError::NoSize(_)) => "claim_without_size",
            ExtenderError::Needs(NeedsError::InvalidClass { .. }) => "invalid_storage_class",
            ExtenderError::Needs(NeedsError::UnknownOrigin { .. }) => "origin_not_known",
        }
    }
}

pub struct Extender {
    inventory: Mutex<Inventory>,
    policy: Policy,
    metrics: Metrics,
    /// Reads a claim the watch has not delivered yet; None in tests that
    /// feed the inventory by hand.
    client: Option<kube::Client>,
}

/// How long a call waits for the caches to be listed, within
/// kube-scheduler's 3 s timeout: a pod failed for a transient state waits
/// for the next cluster event, which can be minutes away.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How long one read of a missing claim may take.
const CLAIM_READ: Duration = Duration::from_millis(500);
/// The pause between reads of a claim the API server would not give: a
/// restarted API server refuses (403) until its RBAC cache is loaded.
const CLAIM_RETRY: Duration = Duration::from_millis(100);

impl Extender {
    pub fn new(policy: Policy, metrics: Metrics) -> Self {
        Extender {
            inventory: Mutex::new(Inventory::with_reservation_limit(policy.max_reservations)),
            policy,
            metrics,
            client: None,
        }
    }

    /// Reads the claims the watch has not delivered yet from the API server.
    pub fn with_client(self, client: kube::Client) -> Self {
        Extender {
            client: Some(client),
            ..self
        }
    }

    /// Brings what `pod` needs into the inventory before it is judged: waits
    /// (bounded) for the first listings, and reads from the API server each
    /// claim of the pod that the watch has not delivered yet (a claim and
    /// its pod are usually made together). What it cannot bring in, the
    /// verbs then answer as a transient state.
    pub async fn catch_up(&self, pod: &Pod) {
        if !PodNeeds::may_need_storage(pod) {
            return;
        }
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        while !self.inventory().unsynced().is_empty() {
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(client) = &self.client else {
            return;
        };
        let mut read = Vec::new();
        loop {
            let missing = match PodNeeds::of(pod, &*self.inventory()) {
                Err(NeedsError::ClaimNotCached(key)) if !read.contains(&key) => key,
                _ => return,
            };
            if !self.read_claim(client, &missing, deadline).await {
                return;
            }
            read.push(missing);
        }
    }

    /// Reads `key` into the inventory, again and again until `deadline` while
    /// the API server fails; false when it could not be read in time.
    async fn read_claim(
        &self,
        client: &kube::Client,
        key: &ClaimKey,
        deadline: tokio::time::Instant,
    ) -> bool {
        let (namespace, name) = key.parts();
        let api: kube::Api<PersistentVolumeClaim> =
            kube::Api::namespaced(client.clone(), namespace);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let error = match tokio::time::timeout(left.min(CLAIM_READ), api.get_opt(name)).await {
                Ok(Ok(Some(claim))) => {
                    tracing::debug!(claim = %key, "read a claim the watch has not delivered");
                    self.inventory().apply_claim(Event::Apply(claim));
                    return true;
                }
                // Deleted meanwhile: the verbs say it is not cached.
                Ok(Ok(None)) => return true,
                Ok(Err(err)) => err.to_string(),
                Err(_) => "no answer in time".to_owned(),
            };
            // The watch may have delivered it meanwhile.
            if self.inventory().claim(key).is_some() {
                return true;
            }
            if tokio::time::Instant::now() + CLAIM_RETRY >= deadline {
                tracing::warn!(claim = %key, %error, "cannot read a claim");
                return false;
            }
            tracing::debug!(claim = %key, %error, "cannot read a claim yet; retrying");
            tokio::time::sleep(CLAIM_RETRY).await;
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The inventory, for the watchers that keep it current.
    pub fn inventory(&self) -> MutexGuard<'_, Inventory> {
        // A panic while holding the lock cannot leave the inventory half
        // updated in a way later events would not repair.
        self.inventory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops expired reservations.
    pub fn expire_reservations(&self, now: Instant) {
        let live = self.inventory().expire(now);
        self.metrics.reservations(live);
    }

    /// Answers `filter`. Only a malformed request is answered in `Error`:
    /// kube-scheduler skips an ignorable extender that answers so, and would
    /// place the pod unchecked. A claim or class that cannot be read fails
    /// every node with the reason, unresolvable; a transient state (caches
    /// not listed yet, a claim not cached yet) fails them resolvable, which
    /// kube-scheduler retries at the next cluster event.
    pub fn filter<'a>(&self, args: ExtenderArgs<'a>) -> ExtenderFilterResult<'a> {
        self.try_filter(args)
            .unwrap_or_else(|err| ExtenderFilterResult {
                error: err.to_string(),
                ..ExtenderFilterResult::default()
            })
    }

    fn try_filter<'a>(
        &self,
        args: ExtenderArgs<'a>,
    ) -> Result<ExtenderFilterResult<'a>, ExtenderError> {
        let (pod, candidates) = unpack(args)?;
        let assessed = match self.assess(&pod, &candidates) {
            Ok(assessed) => assessed,
            Err(err) => {
                self.metrics
                    .filtered(err.kind(), candidates.names().len() as u64);
                tracing::info!(error = %err, "every node failed");
                return Ok(candidates.fail_all(&err.to_string(), err.is_unresolvable()));
            }
        };
        let Some((verdicts, _)) = assessed else {
            return Ok(candidates.pass_all());
        };
        let mut reasons = BTreeMap::<&'static str, u64>::new();
        let mut failed = FailedNodesMap::new();
        let mut unresolvable = FailedNodesMap::new();
        let (nodes, node_names) = candidates.split(verdicts, |name, refusals| {
            for refusal in &refusals {
                *reasons.entry(refusal.kind()).or_default() += 1;
            }
            let message = explain(&refusals);
            if refusals.iter().any(Refusal::is_unresolvable) {
                unresolvable.insert(name, message);
            } else {
                failed.insert(name, message);
            }
        });
        for (reason, count) in reasons {
            self.metrics.filtered(reason, count);
        }
        tracing::debug!(
            failed = failed.len(),
            unresolvable = unresolvable.len(),
            "filtered"
        );
        Ok(ExtenderFilterResult {
            nodes,
            node_names,
            failed_nodes: Some(failed),
            failed_and_unresolvable_nodes: Some(unresolvable),
            error: String::new(),
        })
    }

    /// Answers `prioritize`: every candidate once, in the order sent.
    pub fn prioritize<'a>(
        &self,
        args: ExtenderArgs<'a>,
    ) -> Result<HostPriorityList<'a>, ExtenderError> {
        let (pod, candidates) = unpack(args)?;
        let assessment = self.assess(&pod, &candidates)?;
        let hosts = candidates.into_names();
        let Some((verdicts, needs)) = assessment else {
            return Ok(hosts
                .into_iter()
                .map(|host| HostPriority {
                    host,
                    score: MIN_EXTENDER_PRIORITY,
                })
                .collect());
        };
        let fits: Vec<Option<Fit>> = verdicts
            .into_iter()
            .map(|verdict| match verdict {
                Verdict::Fits(fit) => Some(fit),
                Verdict::Refused(_) => None,
            })
            .collect();
        let scores = scores(&self.score_groups(&needs), &fits);
        Ok(hosts
            .into_iter()
            .zip(scores)
            .map(|(host, score)| HostPriority { host, score })
            .collect())
    }

    fn score_groups(&self, needs: &PodNeeds) -> Vec<ScoreGroup> {
        let mut groups: Vec<ScoreGroup> = Vec::new();
        for claim in &needs.claims {
            let placement = claim.placement.unwrap_or(self.policy.default_placement);
            match groups
                .iter_mut()
                .find(|group| group.media == claim.media && group.placement == placement)
            {
                Some(group) => group.bytes = group.bytes.saturating_add(claim.bytes),
                None => groups.push(ScoreGroup {
                    media: claim.media,
                    placement,
                    bytes: claim.bytes,
                }),
            }
        }
        groups
    }

    /// The verdict on each candidate and the pod's needs; `None` when the pod
    /// needs nothing from lvmlocal and every node passes.
    fn assess(
        &self,
        pod: &Pod,
        candidates: &Candidates,
    ) -> Result<Option<(Vec<Verdict>, PodNeeds)>, ExtenderError> {
        if !PodNeeds::may_need_storage(pod) {
            return Ok(None);
        }
        let now = Instant::now();
        let mut inventory = self.inventory();
        let unsynced = inventory.unsynced();
        if !unsynced.is_empty() {
            return Err(ExtenderError::NotSynced(
                unsynced.into_iter().map(Source::as_str).collect(),
            ));
        }
        let needs = PodNeeds::of(pod, &*inventory)?;
        if needs.is_empty() {
            return Ok(None);
        }
        let verdicts = inventory.assess(
            &PodRef::of(pod),
            &needs,
            &candidates.names(),
            now,
            self.policy.reservation_ttl,
        );
        self.metrics.reservations(inventory.reservations().len());
        Ok(Some((verdicts, needs)))
    }
}

/// The nodes kube-scheduler sent, in the form it sent them.
enum Candidates<'a> {
    Names(Vec<NodeName<'a>>),
    Nodes(List<Node>),
}

fn unpack(args: ExtenderArgs<'_>) -> Result<(Pod, Candidates<'_>), ExtenderError> {
    let pod = args.pod.ok_or(ExtenderError::NoPod)?;
    let candidates = match (args.node_names, args.nodes) {
        (Some(names), _) => Candidates::Names(names),
        (None, Some(nodes)) => Candidates::Nodes(nodes),
        (None, None) => return Err(ExtenderError::NoCandidates),
    };
    Ok((pod, candidates))
}

impl<'a> Candidates<'a> {
    fn names(&self) -> Vec<&str> {
        match self {
            Candidates::Names(names) => names.iter().map(|name| &**name).collect(),
            Candidates::Nodes(nodes) => nodes.items.iter().map(node_name).collect(),
        }
    }

    fn into_names(self) -> Vec<NodeName<'a>> {
        match self {
            Candidates::Names(names) => names,
            Candidates::Nodes(nodes) => nodes
                .items
                .into_iter()
                .map(|node| NodeName::Owned(node.metadata.name.unwrap_or_default()))
                .collect(),
        }
    }

    /// Every node fails with `message`: unresolvable when retrying the pod
    /// cannot help until something outside the scheduler changes.
    fn fail_all(self, message: &str, unresolvable: bool) -> ExtenderFilterResult<'a> {
        let names: Vec<NodeName<'a>> = match &self {
            Candidates::Names(names) => names.clone(),
            Candidates::Nodes(nodes) => nodes
                .items
                .iter()
                .map(|node| NodeName::Owned(node_name(node).to_owned()))
                .collect(),
        };
        let failed: FailedNodesMap = names
            .into_iter()
            .map(|name| (name, message.to_owned()))
            .collect();
        let (nodes, node_names) = match self {
            Candidates::Names(_) => (None, Some(Vec::new())),
            Candidates::Nodes(nodes) => (
                Some(List {
                    items: Vec::new(),
                    ..nodes
                }),
                None,
            ),
        };
        let (failed, unresolvable) = if unresolvable {
            (FailedNodesMap::new(), failed)
        } else {
            (failed, FailedNodesMap::new())
        };
        ExtenderFilterResult {
            nodes,
            node_names,
            failed_nodes: Some(failed),
            failed_and_unresolvable_nodes: Some(unresolvable),
            error: String::new(),
        }
    }

    /// Every node passes, returned exactly as sent.
    fn pass_all(self) -> ExtenderFilterResult<'a> {
        let (nodes, node_names) = self.into_parts();
        ExtenderFilterResult {
            nodes,
            node_names,
            failed_nodes: Some(FailedNodesMap::new()),
            failed_and_unresolvable_nodes: Some(FailedNodesMap::new()),
            error: String::new(),
        }
    }

    fn into_parts(self) -> (Option<List<Node>>, Option<Vec<NodeName<'a>>>) {
        match self {
            Candidates::Names(names) => (None, Some(names)),
            Candidates::Nodes(nodes) => (Some(nodes), None),
        }
    }

    /// The candidates that fit, in order and in the form they came in;
    /// `refused` hears about each of the others.
    fn split(
        self,
        verdicts: Vec<Verdict>,
        mut refused: impl FnMut(NodeName<'a>, Vec<Refusal>),
    ) -> (Option<List<Node>>, Option<Vec<NodeName<'a>>>) {
        match self {
            Candidates::Names(names) => {
                let mut kept = Vec::with_capacity(names.len());
                for (name, verdict) in names.into_iter().zip(verdicts) {
                    match verdict {
                        Verdict::Fits(_) => kept.push(name),
                        Verdict::Refused(refusals) => refused(name, refusals),
                    }
                }
                (None, Some(kept))
            }
            Candidates::Nodes(List { items, metadata }) => {
                let mut kept = Vec::with_capacity(items.len());
                for (node, verdict) in items.into_iter().zip(verdicts) {
                    match verdict {
                        Verdict::Fits(_) => kept.push(node),
                        Verdict::Refused(refusals) => {
                            refused(NodeName::Owned(node_name(&node).to_owned()), refusals)
                        }
                    }
                }
                (
                    Some(List {
                        items: kept,
                        metadata,
                    }),
                    None,
                )
            }
        }
    }
}

fn node_name(node: &Node) -> &str {
    node.metadata.name.as_deref().unwrap_or_default()
}
