//! What happens to a claim whose volume is lost with its node or disk.
//!
//! A local volume does not survive its node. For a replicated store that
//! rebuilds a replica by itself, the way out is a new claim elsewhere: so,
//! only for claims that opt in with [`ON_NODE_LOSS`]` = recreate` (on the
//! claim, or as a parameter of its StorageClass), the
//! controller deletes the claim (and the pod still holding it), and the
//! StatefulSet makes both again on a node that is alive. It acts on positive
//! evidence only, checked against the API server at the moment of acting:
//! the Node object is deleted; or the volume's LV is reported gone; or the
//! agent has been silent for a long grace period *and* the Node is NotReady.
//! At most a few claims per minute are recreated, so a partition that makes
//! many nodes look dead cannot take a cluster's claims with it. Claims
//! without the opt-in are kept, and an event says why and how to opt in.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use lvmlocal_proto::crd::{LogicalVolume, PvcRef};
use lvmlocal_proto::heartbeat::Silence;
use lvmlocal_proto::logical_volume::names_volume;
use lvmlocal_proto::params::{ON_NODE_LOSS, OnNodeLoss};

use crate::caches::Caches;
use crate::kube_store::{recorder, tell};

/// The condition reason the agent gives a volume whose LV is gone.
const VOLUME_LOST: &str = "VolumeLost";

/// Why a volume counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    NodeDeleted,
    VolumeLost,
    AgentSilent,
}

impl Cause {
    /// The event reason.
    pub fn reason(self) -> &'static str {
        match self {
            Cause::NodeDeleted => "NodeDeleted",
            Cause::VolumeLost => "VolumeLost",
            Cause::AgentSilent => "NodeLost",
        }
    }

    fn says(self, node: &str) -> String {
        match self {
            Cause::NodeDeleted => format!("node {node} was deleted and its volume with it"),
            Cause::VolumeLost => format!("the volume's LV is gone from node {node}"),
            Cause::AgentSilent => format!(
                "node {node} is NotReady and its lvmlocal agent has been silent past the grace period"
            ),
        }
    }
}

/// A claim whose volume looks lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub volume: String,
    pub node: String,
    pub claim: PvcRef,
    pub cause: Cause,
    /// What the volume's StorageClass chose, recorded on it at creation.
    pub recorded: OnNodeLoss,
}

/// The losses the caches show: live volumes serving a claim whose node is
/// gone, whose LV is reported lost, or whose agent has been silent for at
/// least `silence_grace`. An agent never heard from is not evidence: that
/// is a node not set up yet, not a node lost.
pub fn losses(
    volumes: &[Arc<LogicalVolume>],
    nodes: &HashSet<String>,
    silence: impl Fn(&str) -> Option<Silence>,
    silence_grace: Duration,
) -> Vec<Loss> {
    let mut found = Vec::new();
    for lv in volumes {
        let Some(claim) = &lv.spec.pvc else {
            continue;
        };
        if lv.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let node = &lv.spec.node_name;
        let lost = lv
            .status
            .as_ref()
            .and_then(|status| status.condition.as_ref())
            .is_some_and(|condition| condition.abnormal && condition.reason == VOLUME_LOST);
        let cause = if !nodes.contains(node) {
            Cause::NodeDeleted
        } else if lost {
            Cause::VolumeLost
        } else if matches!(silence(node), Some(Silence::For(quiet)) if quiet >= silence_grace) {
            Cause::AgentSilent
        } else {
            continue;
        };
        found.push(Loss {
            volume: lv.name_any(),
            node: node.clone(),
            claim: claim.clone(),
            cause,
            recorded: recorded(lv),
        });
    }
    found
}

/// The choice recorded on a `LogicalVolume`: its StorageClass's parameter,
/// or an operator's annotation on the object itself.
pub fn recorded(lv: &LogicalVolume) -> OnNodeLoss {
    lv.annotations()
        .get(ON_NODE_LOSS)
        .and_then(|value| value.parse().ok())
        .unwrap_or_default()
}

/// What to do with a claim whose volume is lost: the claim's own annotation
/// if it has a valid one, else what its class chose. A value that does not
/// parse keeps the claim.
pub fn choice(claim: &PersistentVolumeClaim, recorded: OnNodeLoss) -> OnNodeLoss {
    match claim.annotations().get(ON_NODE_LOSS) {
        Some(value) => value.parse().unwrap_or(OnNodeLoss::Keep),
        None => recorded,
    }
}

/// Whether a Node object says it is not Ready.
pub fn not_ready(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"));
    ready.is_none_or(|ready| ready.status != "True")
}

/// At most `per_minute` actions in any sliding minute.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: usize,
    taken: VecDeque<Instant>,
}

impl RateLimit {
    pub fn new(per_minute: usize) -> Self {
        Self {
            per_minute,
            taken: VecDeque::new(),
        }
    }

    /// Takes one action at `now` if the minute before it has room.
    pub fn take(&mut self, now: Instant) -> bool {
        while self
            .taken
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= Duration::from_secs(60))
        {
            self.taken.pop_front();
        }
        if self.taken.len() >= self.per_minute {
            return false;
        }
        self.taken.push_back(now);
        true
    }
}

pub struct Settings {
    pub silence_grace: Duration,
    pub per_minute: usize,
    pub every: Duration,
}

/// Looks for lost volumes every `settings.every` until the process stops;
/// run by the leader only.
pub async fn run(client: Client, caches: Caches, settings: Settings) {
    let mut recovery = Recovery::new(client, settings.per_minute);
    let mut tick = tokio::time::interval(settings.every);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let found = losses(
            &caches.volumes(),
            &caches.node_names(),
            |node| caches.silence(node, now),
            settings.silence_grace,
        );
        for loss in found {
            recovery.handle(&loss).await;
        }
    }
}

struct Recovery {
    nodes: Api<Node>,
    volumes: Api<LogicalVolume>,
    pvs: Api<PersistentVolume>,
    client: Client,
    recorder: Recorder,
    limit: RateLimit,
    /// Claims (by uid) and causes already told of, so each is told once.
    told: HashSet<(String, Cause)>,
}

#[derive(Debug, thiserror::Error)]
enum RecoveryError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Recovery {
    fn new(client: Client, per_minute: usize) -> Self {
        Self {
            nodes: Api::all(client.clone()),
            volumes: Api::all(client.clone()),
            pvs: Api::all(client.clone()),
            recorder: recorder(client.clone()),
            client,
            limit: RateLimit::new(per_minute),
            told: HashSet::new(),
        }
    }

    #[tracing::instrument(skip_all, fields(volume = %loss.volume, node = %loss.node, claim = %loss.claim.name, cause = loss.cause.reason()))]
    async fn handle(&mut self, loss: &Loss) {
        if let Err(err) = self.try_handle(loss).await {
            tracing::warn!(error = %err, "cannot look into a lost volume; trying again");
        }
    }

    async fn try_handle(&mut self, loss: &Loss) -> Result<(), RecoveryError> {
        if !self.confirmed(loss).await? {
            tracing::debug!("the API server does not confirm the loss");
            return Ok(());
        }
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &loss.claim.namespace);
        let Some(claim) = claims.get_opt(&loss.claim.name).await? else {
            return Ok(());
        };
        if claim.metadata.deletion_timestamp.is_some() || !self.serves(&claim, loss).await? {
            return Ok(());
        }
        let uid = claim.uid().unwrap_or_default();
        let says = loss.cause.says(&loss.node);
        if choice(&claim, loss.recorded) == OnNodeLoss::Keep {
            if self.told.insert((uid, loss.cause)) {
                let note = format!(
                    "{says}; the claim is kept: annotate it {ON_NODE_LOSS}=recreate (or set that \
                     parameter on its StorageClass) to let lvmlocal delete it so its \
                     StatefulSet recreates it on another node"
                );
                tracing::warn!(%note, "lost volume kept");
                self.tell(&claim, EventType::Warning, loss.cause.reason(), note)
                    .await;
            }
            return Ok(());
        }
        if !self.limit.take(Instant::now()) {
            if self.told.insert((uid, loss.cause)) {
                let note = format!(
                    "{says}; recreating the claim waits: more claims than the limit per minute \
                     are being recreated"
                );
                tracing::warn!(%note, "recreation deferred");
                self.tell(&claim, EventType::Warning, "RecoveryDeferred", note)
                    .await;
            }
            return Ok(());
        }
        let note = format!("{says}; deleting the claim so its StatefulSet recreates it elsewhere");
        tracing::warn!(%note, "recreating a lost claim");
        self.tell(&claim, EventType::Warning, loss.cause.reason(), note)
            .await;
        let only_this = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match claims.delete(&loss.claim.name, &only_this).await {
            Ok(_) => {}
            // Gone already, or replaced by a new claim of the same name.
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        }
        self.delete_pods(loss).await
    }

    /// Checks the loss against the API server, not the caches.
    async fn confirmed(&self, loss: &Loss) -> Result<bool, RecoveryError> {
        Ok(match loss.cause {
            Cause::NodeDeleted => self.nodes.get_opt(&loss.node).await?.is_none(),
            Cause::AgentSilent => self
                .nodes
                .get_opt(&loss.node)
                .await?
                .is_some_and(|node| not_ready(&node)),
            Cause::VolumeLost => self
                .volumes
                .get_opt(&loss.volume)
                .await?
                .and_then(|lv| lv.status?.condition)
                .is_some_and(|condition| condition.abnormal && condition.reason == VOLUME_LOST),
        })
    }

    /// Whether `claim` is bound to the lost volume and not to another one.
    async fn serves(
        &self,
        claim: &PersistentVolumeClaim,
        loss: &Loss,
    ) -> Result<bool, RecoveryError> {
        let Some(pv) = claim
            .spec
            .as_ref()
            .and_then(|spec| spec.volume_name.as_deref())
            .filter(|name| !name.is_empty())
        else {
            return Ok(false);
        };
        Ok(self
            .pvs
            .get_opt(pv)
            .await?
            .is_some_and(|pv| names_volume(&pv, &loss.volume)))
    }

    /// Deletes the pods on the lost node that mount the claim, so the
    /// StatefulSet makes a new one. Without a Node no kubelet will confirm a
    /// pod's end, so those are deleted at once.
    async fn delete_pods(&self, loss: &Loss) -> Result<(), RecoveryError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &loss.claim.namespace);
        let on_node = ListParams::default().fields(&format!("spec.nodeName={}", loss.node));
        let params = if loss.cause == Cause::NodeDeleted {
            DeleteParams::default().grace_period(0)
        } else {
            DeleteParams::default()
        };
        for pod in pods.list(&on_node).await?.items {
            if !mounts(&pod, &loss.claim.name) {
                continue;
            }
            let name = pod.name_any();
            tracing::warn!(pod = %name, "deleting the pod of a recreated claim");
            match pods.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// An event on the claim.
    async fn tell(
        &self,
        claim: &PersistentVolumeClaim,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Recover".into(),
            secondary: None,
        };
        tell(&self.recorder, &claim.object_ref(&()), event).await;
    }
}

/// Whether `pod` mounts the claim named `claim`.
fn mounts(pod: &Pod, claim: &str) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.volumes.iter().flatten().any(|volume| {
            volume
                .persistent_volume_claim
                .as_ref()
                .is_some_and(|source| source.claim_name == claim)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lv(name: &str, node: &str, condition: Option<&str>) -> Arc<LogicalVolume> {
        let condition =
            condition.map(|reason| json!({"abnormal": true, "reason": reason, "message": "m"}));
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "lvmlocal.io/v1alpha1",
                "kind": "LogicalVolume",
                "metadata": {"name": name},
                "spec": {"nodeName": node, "media": "nvme", "sizeBytes": 1,
                         "pvc": {"namespace": "db", "name": format!("data-{name}")}},
                "status": {"phase": "Ready", "condition": condition},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn losses_need_positive_evidence() {
        let volumes = [
            lv("on-gone", "gone", None),
            lv("lost", "a", Some("VolumeLost")),
            lv("partial", "a", Some("VolumeUnhealthy")),
            lv("quiet", "quiet", None),
            lv("brief", "brief", None),
            lv("never", "never", None),
            lv("fine", "a", None),
        ];
        let mut unclaimed = (*lv("unclaimed", "gone", None)).clone();
        unclaimed.spec.pvc = None;
        let all: Vec<_> = volumes
            .iter()
            .cloned()
            .chain([Arc::new(unclaimed)])
            .collect();
        let nodes: HashSet<String> = ["a", "quiet", "brief", "never"].map(str::to_owned).into();
        let silence = |node: &str| match node {
            "quiet" => Some(Silence::For(Duration::from_secs(301))),
            "brief" => Some(Silence::For(Duration::from_secs(60))),
            "never" => Some(Silence::Never),
            _ => None,
        };
        let found: Vec<(String, Cause)> = losses(&all, &nodes, silence, Duration::from_secs(300))
            .into_iter()
            .map(|loss| (loss.volume, loss.cause))
            .collect();
        assert_eq!(
            found,
            [
                ("on-gone".to_owned(), Cause::NodeDeleted),
                ("lost".to_owned(), Cause::VolumeLost),
                ("quiet".to_owned(), Cause::AgentSilent),
            ]
        );
    }

    #[test]
    fn the_claim_decides_over_its_class_and_only_recreate_opts_in() {
        let claim = |value: Option<&str>| {
            let mut claim = PersistentVolumeClaim::default();
            if let Some(value) = value {
                claim
                    .annotations_mut()
                    .insert(ON_NODE_LOSS.to_owned(), value.to_owned());
            }
            claim
        };
        use OnNodeLoss::{Keep, Recreate};
        for (annotation, class, chosen) in [
            (Some("recreate"), Keep, Recreate),
            (Some("keep"), Recreate, Keep),
            (Some("yes"), Recreate, Keep),
            (None, Recreate, Recreate),
            (None, Keep, Keep),
        ] {
            assert_eq!(
                choice(&claim(annotation), class),
                chosen,
                "{annotation:?} {class}"
            );
        }
        let mut lv = (*lv("a", "n", None)).clone();
        assert_eq!(recorded(&lv), Keep);
        lv.annotations_mut()
            .insert(ON_NODE_LOSS.to_owned(), "recreate".to_owned());
        assert_eq!(recorded(&lv), Recreate);
    }

    #[test]
    fn rate_limit_slides_over_a_minute() {
        let start = Instant::now();
        let mut limit = RateLimit::new(2);
        assert!(limit.take(start));
        assert!(limit.take(start + Duration::from_secs(10)));
        assert!(!limit.take(start + Duration::from_secs(59)));
        assert!(limit.take(start + Duration::from_secs(60)));
        assert!(!limit.take(start + Duration::from_secs(69)));
        assert!(limit.take(start + Duration::from_secs(70)));
    }

    #[test]
    fn not_ready_unless_ready_is_true() {
        let node = |status: Option<&str>| -> Node {
            let conditions = status.map(|s| json!([{"type": "Ready", "status": s}]));
            serde_json::from_value(
                json!({"metadata": {"name": "n"}, "status": {"conditions": conditions}}),
            )
            .unwrap()
        };
        assert!(!not_ready(&node(Some("True"))));
        assert!(not_ready(&node(Some("Unknown"))));
        assert!(not_ready(&node(Some("False"))));
        assert!(not_ready(&node(None)));
    }
}
