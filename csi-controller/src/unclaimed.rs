//! `LogicalVolume`s that nothing will ever use: no PersistentVolume names
//! them and no claim is waiting for them. They are what a CreateVolume
//! leaves when its claim is deleted while the call waits for the node, or
//! what is left once a Retain volume's PersistentVolume is deleted by hand.
//!
//! Each is reported (a gauge per media class, one event per volume) once it
//! has looked unclaimed for a grace period. Only a volume whose StorageClass
//! chose `lvmlocal.io/on-node-loss: recreate` (recorded on the object when it
//! was made, or annotated on it by an operator) is collected, through the
//! deletion intent, at most a few per minute; every other one is kept for
//! an operator to decide.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use lvmlocal_proto::crd::LogicalVolume;
use lvmlocal_proto::logical_volume::volume_handle;
use lvmlocal_proto::params::{ON_NODE_LOSS, OnNodeLoss};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::caches::Caches;
use crate::kube_store::{delete_as_read, record_intent, recorder, tell};
use crate::recovery::{RateLimit, recorded};

/// The event reason.
const UNCLAIMED: &str = "Unclaimed";

pub struct Settings {
    pub grace: Duration,
    pub per_minute: usize,
    pub every: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MediaLabel {
    media: String,
}

/// `lvmlocal_controller_unclaimed_volumes{media}`.
#[derive(Clone, Default)]
pub struct UnclaimedMetrics {
    volumes: Family<MediaLabel, Gauge>,
}

impl UnclaimedMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "controller_unclaimed_volumes",
            "LogicalVolumes past the grace period with no PersistentVolume and no claim waiting for them",
            self.volumes.clone(),
        );
    }

    fn set(&self, counts: &HashMap<String, i64>) {
        self.volumes.clear();
        for (media, count) in counts {
            self.volumes
                .get_or_create(&MediaLabel {
                    media: media.clone(),
                })
                .set(*count);
        }
    }
}

/// Since when each volume (by uid) has looked unclaimed to this process.
/// The clock starts at this process's first look, so a restart only delays.
#[derive(Debug, Default)]
pub struct Sightings {
    since: HashMap<String, Instant>,
}

impl Sightings {
    /// Of the live `volumes`, those no PersistentVolume names (by volume
    /// handle in `handles`) and that `waited_for` does not claim, that have
    /// looked so for `grace` as of `now`.
    pub fn overdue(
        &mut self,
        volumes: &[Arc<LogicalVolume>],
        handles: &HashSet<String>,
        waited_for: impl Fn(&LogicalVolume) -> bool,
        grace: Duration,
        now: Instant,
    ) -> Vec<Arc<LogicalVolume>> {
        let mut seen = HashSet::new();
        let mut overdue = Vec::new();
        for lv in volumes {
            let uid = lv.uid().unwrap_or_default();
            // A snapshot is its VolumeSnapshotContent's, never a PV's.
            if lv.metadata.deletion_timestamp.is_some()
                || lv.spec.snapshot.is_some()
                || handles.contains(&lv.name_any())
                || waited_for(lv)
            {
                continue;
            }
            let since = *self.since.entry(uid.clone()).or_insert(now);
            seen.insert(uid);
            if now.saturating_duration_since(since) >= grace {
                overdue.push(lv.clone());
            }
        }
        self.since.retain(|uid, _| seen.contains(uid));
        overdue
    }
}

/// Whether `claim`, the one a volume was made for, may still get it: it
/// exists, is not being deleted, and is bound to no PersistentVolume in
/// `pvs` (so the provisioner keeps calling CreateVolume for it, or its PV
/// went missing, which an operator has to look at).
pub fn waits(claim: Option<&PersistentVolumeClaim>, pvs: &HashSet<String>) -> bool {
    claim.is_some_and(|claim| {
        claim.metadata.deletion_timestamp.is_none()
            && claim
                .spec
                .as_ref()
                .and_then(|spec| spec.volume_name.as_deref())
                .is_none_or(|pv| !pvs.contains(pv))
    })
}

/// The volume handles of this driver's PersistentVolumes.
fn handles(pvs: &[PersistentVolume]) -> HashSet<String> {
    pvs.iter()
        .filter_map(volume_handle)
        .map(str::to_owned)
        .collect()
}

/// Sweeps every `settings.every` until the process stops; run by the leader
/// only.
pub async fn run(client: Client, caches: Caches, metrics: UnclaimedMetrics, settings: Settings) {
    let mut sweeper = Sweeper::new(client, metrics, settings.per_minute);
    let mut tick = tokio::time::interval(settings.every);
    loop {
        tick.tick().await;
        if let Err(err) = sweeper.sweep(&caches.volumes(), settings.grace).await {
            tracing::warn!(error = %err, "cannot look for unclaimed volumes; trying again");
        }
    }
}

struct Sweeper {
    volumes: Api<LogicalVolume>,
    pvs: Api<PersistentVolume>,
    client: Client,
    recorder: Recorder,
    metrics: UnclaimedMetrics,
    limit: RateLimit,
    sightings: Sightings,
    /// Volumes (by uid) already told of.
    told: HashSet<String>,
}

impl Sweeper {
    fn new(client: Client, metrics: UnclaimedMetrics, per_minute: usize) -> Self {
        Self {
            volumes: Api::all(client.clone()),
            pvs: Api::all(client.clone()),
            recorder: recorder(client.clone()),
            client,
            metrics,
            limit: RateLimit::new(per_minute),
            sightings: Sightings::default(),
            told: HashSet::new(),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn sweep(
        &mut self,
        volumes: &[Arc<LogicalVolume>],
        grace: Duration,
    ) -> Result<(), kube::Error> {
        // From the API server itself: a lagging cache could hide a PV.
        let pvs = self.pvs.list(&ListParams::default()).await?.items;
        let handles = handles(&pvs);
        let pv_names: HashSet<String> = pvs.iter().map(ResourceExt::name_any).collect();
        let mut claims = HashMap::new();
        for lv in volumes {
            if let Some(pvc) = &lv.spec.pvc
                && !handles.contains(&lv.name_any())
            {
                let api: Api<PersistentVolumeClaim> =
                    Api::namespaced(self.client.clone(), &pvc.namespace);
                claims.insert(lv.name_any(), api.get_opt(&pvc.name).await?);
            }
        }
        let waited_for = |lv: &LogicalVolume| {
            waits(
                claims.get(&lv.name_any()).and_then(Option::as_ref),
                &pv_names,
            )
        };
        let overdue = self
            .sightings
            .overdue(volumes, &handles, waited_for, grace, Instant::now());
        let mut counts = HashMap::<String, i64>::new();
        for lv in &overdue {
            *counts.entry(lv.spec.media.to_string()).or_default() += 1;
        }
        self.metrics.set(&counts);
        for lv in overdue {
            self.handle(&lv).await;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(volume = %lv.name_any(), node = %lv.spec.node_name))]
    async fn handle(&mut self, lv: &LogicalVolume) {
        let uid = lv.uid().unwrap_or_default();
        let what = format!(
            "no PersistentVolume names LogicalVolume {} on node {} and no claim is waiting for it",
            lv.name_any(),
            lv.spec.node_name
        );
        if recorded(lv) == OnNodeLoss::Keep {
            if self.told.insert(uid) {
                let note = format!(
                    "{what}; it is kept: annotate it {ON_NODE_LOSS}=recreate to let lvmlocal \
                     collect it, or {} to remove it by hand",
                    lvmlocal_proto::crd::DELETE_INTENT
                );
                tracing::warn!(%note, "unclaimed volume kept");
                self.tell(lv, note).await;
            }
            return;
        }
        if !self.limit.take(Instant::now()) {
            tracing::info!("collecting an unclaimed volume waits for the rate limit");
            return;
        }
        let note = format!("{what}; collecting it, as {ON_NODE_LOSS}=recreate allows");
        tracing::warn!(%note, "collecting an unclaimed volume");
        let collected = async {
            let marked = record_intent(
                &self.volumes,
                lv,
                &format!("unclaimed, collected by lvmlocal-controller: {what}"),
            )
            .await?;
            delete_as_read(&self.volumes, &marked).await
        };
        match collected.await {
            Ok(()) => self.tell(lv, note).await,
            // Changed since it was judged: judged again at the next sweep.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
            Err(err) => tracing::warn!(error = %err, "cannot collect an unclaimed volume"),
        }
    }

    /// A Warning event on the volume.
    async fn tell(&self, lv: &LogicalVolume, note: String) {
        let event = Event {
            type_: EventType::Warning,
            reason: UNCLAIMED.into(),
            note: Some(note),
            action: "Collect".into(),
            secondary: None,
        };
        tell(&self.recorder, &lv.object_ref(&()), event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lvmlocal_proto::DRIVER_NAME;
    use serde_json::json;

    fn lv(name: &str, deleting: bool) -> Arc<LogicalVolume> {
        let deletion = deleting.then_some("2026-01-01T00:00:00Z");
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "lvmlocal.io/v1alpha1",
                "kind": "LogicalVolume",
                "metadata": {"name": name, "uid": format!("uid-{name}"),
                             "deletionTimestamp": deletion},
                "spec": {"nodeName": "n", "media": "ssd", "sizeBytes": 1,
                         "pvc": {"namespace": "db", "name": format!("data-{name}")}},
            }))
            .unwrap(),
        )
    }

    fn claim(volume_name: Option<&str>, deleting: bool) -> PersistentVolumeClaim {
        let deletion = deleting.then_some("2026-01-01T00:00:00Z");
        serde_json::from_value(json!({
            "metadata": {"name": "c", "deletionTimestamp": deletion},
            "spec": {"volumeName": volume_name},
        }))
        .unwrap()
    }

    fn names(volumes: &[Arc<LogicalVolume>]) -> Vec<String> {
        volumes.iter().map(|lv| lv.name_any()).collect()
    }

    #[test]
    fn a_claim_waits_unless_gone_or_bound_to_another_volume() {
        let pvs: HashSet<String> = ["pvc-other".to_owned()].into();
        assert!(waits(Some(&claim(None, false)), &pvs));
        assert!(waits(Some(&claim(Some(""), false)), &pvs));
        assert!(
            waits(Some(&claim(Some("pvc-missing"), false)), &pvs),
            "a claim whose PV is missing is for an operator"
        );
        assert!(!waits(Some(&claim(Some("pvc-other"), false)), &pvs));
        assert!(!waits(Some(&claim(None, true)), &pvs));
        assert!(!waits(None, &pvs));
    }

    #[test]
    fn a_snapshot_is_never_unclaimed() {
        let mut snapshot = (*lv("snap-1", false)).clone();
        snapshot.spec.snapshot = Some(lvmlocal_proto::crd::SnapshotSpec {
            source_volume: "pvc-1".into(),
            volume_snapshot: None,
        });
        let mut sightings = Sightings::default();
        let now = Instant::now();
        for later in [now, now + Duration::from_secs(3600)] {
            let overdue = sightings.overdue(
                &[Arc::new(snapshot.clone())],
                &HashSet::new(),
                |_| false,
                Duration::from_secs(60),
                later,
            );
            assert!(overdue.is_empty());
        }
    }

    #[test]
    fn overdue_after_the_grace_and_only_while_unclaimed() {
        let grace = Duration::from_secs(600);
        let volumes = [
            lv("with-pv", false),
            lv("waited-for", false),
            lv("deleting", false),
            lv("left", false),
        ];
        let mut volumes = volumes.to_vec();
        volumes[2] = lv("deleting", true);
        let handles: HashSet<String> = ["with-pv".to_owned()].into();
        let waited_for = |lv: &LogicalVolume| lv.name_any() == "waited-for";
        let mut sightings = Sightings::default();
        let t0 = Instant::now();
        assert!(
            sightings
                .overdue(&volumes, &handles, waited_for, grace, t0)
                .is_empty()
        );
        assert!(
            sightings
                .overdue(&volumes, &handles, waited_for, grace, t0 + grace / 2)
                .is_empty()
        );
        assert_eq!(
            names(&sightings.overdue(&volumes, &handles, waited_for, grace, t0 + grace)),
            ["left"]
        );
        // Named by a PV for one sweep: the clock starts over.
        let named: HashSet<String> = ["left".to_owned()].into();
        assert!(
            sightings
                .overdue(&volumes, &named, waited_for, grace, t0 + grace)
                .is_empty()
        );
        assert!(
            sightings
                .overdue(
                    &volumes,
                    &handles,
                    waited_for,
                    grace,
                    t0 + grace + grace / 2
                )
                .is_empty()
        );
    }

    #[test]
    fn handles_are_this_drivers_only() {
        let pv = |driver: &str, handle: &str| -> PersistentVolume {
            serde_json::from_value(json!({
                "metadata": {"name": handle},
                "spec": {"csi": {"driver": driver, "volumeHandle": handle}},
            }))
            .unwrap()
        };
        let found = handles(&[pv(DRIVER_NAME, "mine"), pv("other.io", "theirs")]);
        assert_eq!(found, HashSet::from(["mine".to_owned()]));
    }
}
