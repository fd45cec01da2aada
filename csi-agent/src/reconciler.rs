//! The node's `LogicalVolume`s carried out on its LVM: each object of this
//! node becomes an LV of its media class and at least its size, and grows
//! when its spec grows. A deleted object's LV is removed only on recorded
//! intent: the object carries [`DELETE_INTENT`] and no PersistentVolume
//! names the volume any more. Any other deletion lets the object go and
//! keeps the LV, which the orphan audit then reports.
//!
//! The LV list is the truth. Every reconcile starts from what `lvs` shows, so
//! after a restart each object's status is rebuilt from the LV tags; a tagged
//! LV that no object claims is reported as orphaned and left alone.
//!
//! `look → plan → carry out → status`: [`plan`] and [`status`] are pure;
//! [`reconcile`] only runs what they decide. The orphan audit is
//! [`crate::orphans`].

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{
    DELETE_INTENT, IoLimitsStatus, LV_FINALIZER, LogicalVolume, LogicalVolumePhase,
    LogicalVolumeStatus, VolumeCondition,
};
use lvmlocal_proto::logical_volume::{delete_intent, persistent_volumes_naming, volume_of};
use lvmlocal_proto::volume::FsType;
use serde_json::{Value, json};

use crate::io_limits::IoLimiter;
use crate::metrics::Metrics;
use crate::node_storage::{FIELD_MANAGER, recorder};
use crate::orphans::OrphanCheck;
use crate::volumes::{LocalVolume, VolumeBackend, VolumeError, VolumeRequest};

/// A ready volume is looked at again this often, so that an LV gone from
/// under it shows in its status.
const RECHECK: Duration = Duration::from_secs(300);
/// A failed volume is tried again this often: space may have been freed.
const RETRY_FAILED: Duration = Duration::from_secs(60);
/// A deletion waiting for its PersistentVolume to go is looked at again
/// this often: the provisioner deletes the PV right after DeleteVolume.
const WAIT_FOR_PV: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Reason of the failure and the condition of a volume whose LV is gone.
const LOST: &str = "VolumeLost";

/// What to do about one `LogicalVolume`, given its LV on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not this agent's to act on: another node's object, or one being
    /// deleted that no longer carries the finalizer.
    Leave,
    /// Put the finalizer on before an LV is made, so that no deletion can
    /// slip past it.
    AddFinalizer,
    /// Create the LV, or grow it to the spec's size.
    Ensure(VolumeRequest),
    /// The LV already is what the spec asks; only the status may be stale.
    Report(LocalVolume),
    /// The spec cannot be carried out; the status says why, nothing is touched.
    Refuse(Failure),
    /// Being deleted on recorded intent: remove the LV once no
    /// PersistentVolume names it, then drop the finalizer at this index.
    Remove { finalizer: usize },
    /// Being deleted without a recorded intent: keep the LV, drop the
    /// finalizer at this index; the LV is an orphan from now on.
    Keep { finalizer: usize },
    /// Being deleted and the LV is already gone: drop the finalizer.
    Release { finalizer: usize },
}

/// Why a volume is `Failed`, and what is left of it on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Names the failure in events and metrics, e.g. `NotEnoughSpace`.
    pub reason: &'static str,
    pub message: String,
    pub device_path: Option<String>,
    pub size_bytes: Option<u64>,
}

impl Failure {
    fn new(reason: &'static str, message: String, existing: Option<&LocalVolume>) -> Self {
        Self {
            reason,
            message,
            device_path: existing.map(|volume| volume.device_path.clone()),
            size_bytes: existing.map(|volume| volume.size_bytes),
        }
    }

    /// The failure `err` amounts to for a volume whose LV is `existing`.
    /// None when LVM itself failed: that is retried, not reported as the
    /// volume's fate.
    pub fn of(err: &VolumeError, existing: Option<&LocalVolume>) -> Option<Self> {
        let reason = match err {
            VolumeError::NoSpace { .. } => "NotEnoughSpace",
            VolumeError::NoGroup(_) => "NoVolumeGroup",
            VolumeError::OtherMedia { .. } => "OtherMedia",
            VolumeError::NoOrigin { .. } => "NoSource",
            VolumeError::Lvm(_) => return None,
        };
        Some(Self::new(reason, err.to_string(), existing))
    }

    /// The volume's condition, for a failure that amounts to one: a volume
    /// that never existed is not abnormal, only not made.
    fn condition(&self) -> Option<VolumeCondition> {
        (self.reason == LOST).then(|| VolumeCondition::abnormal(LOST, self.message.clone()))
    }

    /// The LV was made once and is gone. The device path stays in the
    /// status: it is what tells later reconciles (and the controller) that
    /// this volume had data, and a blank LV must not take its place.
    fn lost(device_path: String) -> Self {
        Self {
            reason: LOST,
            message: format!(
                "the LV {device_path} is gone from the node; a blank one is not made in its place"
            ),
            device_path: Some(device_path),
            size_bytes: None,
        }
    }
}

/// What the node has for a volume, as its status will say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ready(LocalVolume),
    Failed(Failure),
}

/// Decides what `lv` needs, given its LV on `node` (`local`).
pub fn plan(lv: &LogicalVolume, local: Option<&LocalVolume>, node: &str) -> Plan {
    if lv.spec.node_name != node {
        return Plan::Leave;
    }
    let finalizer = lv.finalizers().iter().position(|name| name == LV_FINALIZER);
    if lv.metadata.deletion_timestamp.is_some() {
        return match (finalizer, local) {
            (None, _) => Plan::Leave,
            (Some(finalizer), Some(_)) if delete_intent(lv).is_some() => Plan::Remove { finalizer },
            (Some(finalizer), Some(_)) => Plan::Keep { finalizer },
            (Some(finalizer), None) => Plan::Release { finalizer },
        };
    }
    if finalizer.is_none() {
        return Plan::AddFinalizer;
    }
    let request = match request(lv) {
        Ok(request) => request,
        Err(message) => return Plan::Refuse(Failure::new("InvalidSpec", message, local)),
    };
    match local {
        Some(local) if local.media != request.media => {
            let err = VolumeError::OtherMedia {
                id: request.id,
                existing: local.media,
                wanted: request.media,
            };
            Plan::Refuse(Failure::new("OtherMedia", err.to_string(), Some(local)))
        }
        Some(local) if local.size_bytes >= request.size_bytes => Plan::Report(local.clone()),
        Some(_) => Plan::Ensure(request),
        None => match lv.status.as_ref().and_then(|s| s.device_path.clone()) {
            Some(device_path) => Plan::Refuse(Failure::lost(device_path)),
            None => Plan::Ensure(request),
        },
    }
}

/// The LV request `lv` stands for, checked as the controller checks it.
fn request(lv: &LogicalVolume) -> Result<VolumeRequest, String> {
    let volume = volume_of(lv).map_err(|err| err.to_string())?;
    if volume.size_bytes == 0 {
        return Err(format!("LogicalVolume {}: spec.sizeBytes is 0", volume.id));
    }
    Ok(VolumeRequest {
        id: volume.id.to_string(),
        media: volume.media,
        size_bytes: volume.size_bytes,
        access: volume
            .access
            .fs_type()
            .map_or("block", FsType::as_str)
            .to_owned(),
        pvc: lv
            .spec
            .pvc
            .as_ref()
            .map(|pvc| format!("{}/{}", pvc.namespace, pvc.name)),
        thin: volume.thin,
        origin: match (&lv.spec.snapshot, &lv.spec.source) {
            (Some(snapshot), _) => Some(snapshot.source_volume.clone()),
            (None, Some(source)) => Some(source.name.clone()),
            (None, None) => None,
        },
        snapshot: lv.spec.snapshot.is_some(),
    })
}

/// The status `outcome` amounts to: only what was observed, answering the
/// object's current generation.
pub fn status(
    lv: &LogicalVolume,
    outcome: &Outcome,
    io_limits: Option<IoLimitsStatus>,
) -> LogicalVolumeStatus {
    let observed_generation = lv.metadata.generation;
    match outcome {
        Outcome::Ready(volume) => LogicalVolumeStatus {
            phase: LogicalVolumePhase::Ready,
            device_path: Some(volume.device_path.clone()),
            size_bytes: Some(volume.size_bytes),
            message: None,
            observed_generation,
            condition: Some(volume.condition()),
            io_limits,
        },
        Outcome::Failed(failure) => LogicalVolumeStatus {
            phase: LogicalVolumePhase::Failed,
            device_path: failure.device_path.clone(),
            size_bytes: failure.size_bytes,
            message: Some(failure.message.clone()),
            observed_generation,
            condition: failure.condition(),
            io_limits,
        },
    }
}

/// The condition worth telling of when it goes from `before` to `after`:
/// abnormal for a new reason, or healthy again after being abnormal.
fn turned<'a>(
    before: Option<&VolumeCondition>,
    after: Option<&'a VolumeCondition>,
) -> Option<&'a VolumeCondition> {
    let after = after?;
    let was_abnormal = before.is_some_and(|b| b.abnormal);
    match (was_abnormal, after.abnormal) {
        (_, true) if before.is_some_and(|b| b.abnormal && b.reason == after.reason) => None,
        (_, true) => Some(after),
        (true, false) => Some(after),
        (false, false) => None,
    }
}

/// A JSON patch adding the finalizer, refused if the list changed since
/// `lv` was read.
pub fn add_finalizer(lv: &LogicalVolume) -> Value {
    match lv.metadata.finalizers.as_deref() {
        None | Some([]) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [LV_FINALIZER]},
        ]),
        Some(current) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": LV_FINALIZER},
        ]),
    }
}

/// A JSON patch removing the finalizer at `index` and no other, refused if
/// something else has moved there.
pub fn drop_finalizer(index: usize) -> Value {
    let path = format!("/metadata/finalizers/{index}");
    json!([
        {"op": "test", "path": path, "value": LV_FINALIZER},
        {"op": "remove", "path": path},
    ])
}

/// Wait before the next try after `failures` failures in a row.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} failed: {source}")]
    Lvm {
        action: &'static str,
        #[source]
        source: VolumeError,
    },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Names the error in metrics and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Lvm { .. } => "LvmFailed",
            Error::Kube(_) => "KubeApiFailed",
        }
    }
}

pub struct Context<B> {
    pub volumes: Arc<B>,
    pub limiter: Arc<IoLimiter>,
    pub api: Api<LogicalVolume>,
    pub recorder: Recorder,
    pub node: String,
    pub metrics: Arc<Metrics>,
    pvs: Api<PersistentVolume>,
    client: Client,
    /// Woken when an LV becomes an orphan, so that it is reported now.
    pub orphan_audit: Arc<Notify>,
    /// Failures in a row per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Deletions already reported as waiting for their PersistentVolume.
    waiting: Mutex<HashSet<String>>,
    /// The abnormal volumes of the node, for the metric: media, reason.
    abnormal: Mutex<HashMap<String, (MediaClass, String)>>,
}

impl<B: VolumeBackend> Context<B> {
    pub fn new(
        client: Client,
        node: &str,
        volumes: Arc<B>,
        limiter: Arc<IoLimiter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            volumes,
            limiter,
            api: Api::all(client.clone()),
            pvs: Api::all(client.clone()),
            recorder: recorder(client.clone(), node),
            client,
            node: node.to_owned(),
            metrics,
            orphan_audit: Arc::default(),
            failures: Mutex::default(),
            waiting: Mutex::default(),
            abnormal: Mutex::default(),
        }
    }

    /// The PersistentVolumes that still name volume `name`; the first time
    /// a deletion has to wait for one, an event says so.
    async fn blocking_pvs(&self, lv: &LogicalVolume) -> Result<Vec<String>, Error> {
        let name = lv.name_any();
        let pvs = persistent_volumes_naming(&self.pvs, &name).await?;
        let first = {
            let mut waiting = self.waiting.lock().expect("waiting set poisoned");
            if pvs.is_empty() {
                waiting.remove(&name);
                false
            } else {
                waiting.insert(name)
            }
        };
        if first {
            let note = format!(
                "PersistentVolume {} still names this volume; its LV is removed once no PersistentVolume does",
                pvs.join(", ")
            );
            tracing::info!(pvs = ?pvs, "deletion waits for the PersistentVolume");
            self.event(
                lv,
                EventType::Normal,
                "WaitingForPersistentVolume",
                "Delete",
                note,
            )
            .await;
        }
        Ok(pvs)
    }

    async fn patch_finalizers(&self, name: &str, ops: Value) -> Result<(), Error> {
        let ops = serde_json::from_value(ops).expect("finalizer patches are well-formed");
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.api
            .patch(name, &params, &Patch::<()>::Json(ops))
            .await?;
        Ok(())
    }

    /// Writes the status `outcome` amounts to, unless the object already
    /// says exactly that: a reconcile that changes nothing writes nothing.
    async fn report(&self, lv: &LogicalVolume, outcome: Outcome) -> Result<Action, Error> {
        let io_limits = match &outcome {
            Outcome::Ready(volume) => self.hold(lv, volume).await,
            Outcome::Failed(_) => lv.status.as_ref().and_then(|s| s.io_limits.clone()),
        };
        let status = status(lv, &outcome, io_limits);
        self.count_condition(lv, status.condition.as_ref());
        if lv.status.as_ref() != Some(&status) {
            let patch = json!({
                "apiVersion": LogicalVolume::api_version(&()),
                "kind": LogicalVolume::kind(&()),
                "status": status,
            });
            self.api
                .patch_status(
                    &lv.name_any(),
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(patch),
                )
                .await?;
            match &outcome {
                Outcome::Ready(volume) => tracing::info!(
                    device = %volume.device_path,
                    bytes = volume.size_bytes,
                    "volume ready"
                ),
                Outcome::Failed(failure) => {
                    tracing::warn!(reason = failure.reason, message = %failure.message, "volume failed");
                    self.warn(lv, failure.reason, "Provision", failure.message.clone())
                        .await;
                }
            }
            let before = lv.status.as_ref().and_then(|s| s.condition.as_ref());
            if let Some(condition) = turned(before, status.condition.as_ref()) {
                self.tell_claim(lv, condition).await;
            }
            let io_before = lv.status.as_ref().and_then(|s| s.io_limits.as_ref());
            if let Some(io) = &status.io_limits
                && io_before != Some(io)
            {
                if io.enforced {
                    tracing::info!(limits = %io.applied, "IO limits in force");
                } else {
                    let why = io.message.clone().unwrap_or_default();
                    tracing::warn!(limits = %io.applied, %why, "IO limits not enforced");
                    self.warn(
                        lv,
                        "IoLimitsNotEnforced",
                        "LimitIO",
                        format!(
                            "{} cannot be enforced: {why}; the volume works without",
                            io.applied
                        ),
                    )
                    .await;
                }
            }
        }
        Ok(match outcome {
            Outcome::Ready(_) => Action::requeue(RECHECK),
            Outcome::Failed(failure) => {
                self.metrics.reconcile_failed(failure.reason);
                Action::requeue(RETRY_FAILED)
            }
        })
    }

    /// Holds the pods of `volume` to the object's IO limits; the status to
    /// report, none while the volume has no limits and never had.
    async fn hold(&self, lv: &LogicalVolume, volume: &LocalVolume) -> Option<IoLimitsStatus> {
        let had = lv.status.as_ref().is_some_and(|s| s.io_limits.is_some());
        if lv.spec.io_limits.is_none() && !had {
            return None;
        }
        let limits = lv.spec.io_limits.unwrap_or_default();
        let limiter = self.limiter.clone();
        let (id, device) = (volume.id.clone(), PathBuf::from(&volume.device_path));
        Some(
            tokio::task::spawn_blocking(move || limiter.set(&id, &device, limits))
                .await
                .unwrap_or_else(|err| IoLimitsStatus {
                    applied: limits,
                    enforced: false,
                    message: Some(format!("applying the limits stopped: {err}")),
                }),
        )
    }

    /// Forgets the IO limits and publications of a volume whose LV is gone.
    async fn forget_limits(&self, name: &str) {
        let limiter = self.limiter.clone();
        let name = name.to_owned();
        let _ = tokio::task::spawn_blocking(move || limiter.forget(&name)).await;
    }

    /// Keeps the count of abnormal volumes by media and reason current.
    fn count_condition(&self, lv: &LogicalVolume, condition: Option<&VolumeCondition>) {
        let mut abnormal = self.abnormal.lock().expect("condition table poisoned");
        match condition.filter(|condition| condition.abnormal) {
            Some(condition) => {
                abnormal.insert(lv.name_any(), (lv.spec.media, condition.reason.clone()));
            }
            None => {
                abnormal.remove(&lv.name_any());
            }
        }
        let mut counts = HashMap::new();
        for key in abnormal.values() {
            *counts.entry(key.clone()).or_default() += 1;
        }
        self.metrics.abnormal_volumes(&counts);
    }

    /// Tells the claim `lv` serves, and `lv` itself, that its volume's health
    /// changed: a Warning when it turned abnormal, Normal when it recovered.
    /// An event lost is only logged.
    async fn tell_claim(&self, lv: &LogicalVolume, condition: &VolumeCondition) {
        let type_ = if condition.abnormal {
            tracing::warn!(reason = %condition.reason, message = %condition.message, "volume abnormal");
            EventType::Warning
        } else {
            EventType::Normal
        };
        if condition.reason != LOST {
            // A lost volume's own event is its failure's.
            self.event(
                lv,
                type_,
                &condition.reason,
                "Health",
                condition.message.clone(),
            )
            .await;
        }
        let Some(pvc) = &lv.spec.pvc else {
            return;
        };
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &pvc.namespace);
        let claim = match claims.get_metadata(&pvc.name).await {
            Ok(claim) => claim,
            Err(err) => {
                tracing::warn!(error = %err, pvc = %pvc.name, "cannot read the claim to tell it of its volume");
                return;
            }
        };
        let reference = ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("PersistentVolumeClaim".to_owned()),
            namespace: Some(pvc.namespace.clone()),
            name: Some(pvc.name.clone()),
            uid: claim.metadata.uid,
            ..ObjectReference::default()
        };
        let event = Event {
            type_,
            reason: condition.reason.clone(),
            note: Some(format!("volume {}: {}", lv.name_any(), condition.message)),
            action: "Health".into(),
            secondary: Some(lv.object_ref(&())),
        };
        if let Err(err) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %err, pvc = %pvc.name, "cannot record event on the claim");
        }
    }

    /// Records a Warning event on `lv`; an event lost is only logged.
    async fn warn(&self, lv: &LogicalVolume, reason: &str, action: &str, note: String) {
        self.event(lv, EventType::Warning, reason, action, note)
            .await;
    }

    async fn event(
        &self,
        lv: &LogicalVolume,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &lv.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "cannot record event");
        }
    }
}

/// Brings the LV of `lv` and its status in line with its spec.
#[tracing::instrument(skip_all, fields(volume = %lv.name_any(), generation = lv.metadata.generation))]
pub async fn reconcile<B: VolumeBackend>(
    lv: Arc<LogicalVolume>,
    ctx: Arc<Context<B>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = carry_out(&lv, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    match &result {
        Ok(_) => {
            ctx.failures
                .lock()
                .expect("failure table poisoned")
                .remove(&lv.name_any());
        }
        Err(err) => {
            tracing::warn!(error = %err, "reconcile failed");
            ctx.metrics.reconcile_failed(err.reason());
            if let Error::Lvm { action, source } = err {
                ctx.warn(&lv, err.reason(), action, source.to_string())
                    .await;
            }
        }
    }
    result
}

async fn carry_out<B: VolumeBackend>(
    lv: &LogicalVolume,
    ctx: &Context<B>,
) -> Result<Action, Error> {
    let name = lv.name_any();
    let local = ctx.volumes.get(&name).await.map_err(|source| Error::Lvm {
        action: "Inspect",
        source,
    })?;
    let plan = plan(lv, local.as_ref(), &ctx.node);
    tracing::debug!(?plan);
    match plan {
        Plan::Leave => Ok(Action::await_change()),
        Plan::AddFinalizer => {
            ctx.patch_finalizers(&name, add_finalizer(lv)).await?;
            // The patched object comes back through the watch.
            Ok(Action::await_change())
        }
        Plan::Ensure(request) => {
            let outcome = match ctx.volumes.ensure(&request).await {
                Ok(volume) => Outcome::Ready(volume),
                Err(err) => match Failure::of(&err, local.as_ref()) {
                    Some(failure) => Outcome::Failed(failure),
                    None => {
                        return Err(Error::Lvm {
                            action: "Provision",
                            source: err,
                        });
                    }
                },
            };
            ctx.report(lv, outcome).await
        }
        Plan::Report(volume) => ctx.report(lv, Outcome::Ready(volume)).await,
        Plan::Refuse(failure) => ctx.report(lv, Outcome::Failed(failure)).await,
        Plan::Remove { finalizer } => {
            if !ctx.blocking_pvs(lv).await?.is_empty() {
                return Ok(Action::requeue(WAIT_FOR_PV));
            }
            tracing::info!(intent = delete_intent(lv), "removing the volume");
            ctx.volumes
                .remove(&name)
                .await
                .map_err(|source| Error::Lvm {
                    action: "Remove",
                    source,
                })?;
            tracing::info!("volume removed");
            ctx.forget_limits(&name).await;
            ctx.count_condition(lv, None);
            ctx.patch_finalizers(&name, drop_finalizer(finalizer))
                .await?;
            Ok(Action::await_change())
        }
        Plan::Keep { finalizer } => {
            let device = local.map(|volume| volume.device_path).unwrap_or_default();
            let note = format!(
                "deleted without the {DELETE_INTENT} annotation: the LV {device} and its data are \
                 kept as an orphan; a LogicalVolume re-created with this name adopts it"
            );
            tracing::warn!(%device, "LogicalVolume deleted without intent; keeping its LV");
            ctx.warn(lv, "DeletedWithoutIntent", "Delete", note).await;
            ctx.count_condition(lv, None);
            ctx.patch_finalizers(&name, drop_finalizer(finalizer))
                .await?;
            ctx.orphan_audit.notify_one();
            Ok(Action::await_change())
        }
        Plan::Release { finalizer } => {
            ctx.forget_limits(&name).await;
            ctx.count_condition(lv, None);
            ctx.patch_finalizers(&name, drop_finalizer(finalizer))
                .await?;
            Ok(Action::await_change())
        }
    }
}

/// Tries a failing object again after a wait that doubles with each
/// failure in a row.
pub fn error_policy<B>(lv: Arc<LogicalVolume>, _err: &Error, ctx: Arc<Context<B>>) -> Action {
    let mut failures = ctx.failures.lock().expect("failure table poisoned");
    let count = failures.entry(lv.name_any()).or_default();
    *count = count.saturating_add(1);
    Action::requeue(backoff(*count))
}

/// Reconciles the `LogicalVolume`s of `node` and watches for orphaned LVs;
/// runs until the task is dropped. Every object is looked at again each
/// time `lv_changes` moves (LVM showed a change the agent did not make), so
/// a lost or failing LV shows in its status within a rescan.
pub async fn run<B: VolumeBackend>(
    client: Client,
    node: String,
    volumes: Arc<B>,
    limiter: Arc<IoLimiter>,
    metrics: Arc<Metrics>,
    lv_changes: tokio::sync::watch::Receiver<u64>,
) {
    let objects = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut audit_changes = lv_changes.clone();
    let changed = futures::stream::unfold(lv_changes, |mut changes| async move {
        changes.changed().await.ok().map(|()| ((), changes))
    });
    let controller = Controller::new(Api::<LogicalVolume>::all(client.clone()), objects)
        .reconcile_all_on(changed);
    let context = Arc::new(Context::new(
        client.clone(),
        &node,
        volumes.clone(),
        limiter,
        metrics.clone(),
    ));
    // What LVM shows changed behind the agent's back (an LV made or
    // removed by hand) changes what no object accounts for.
    let wake = context.orphan_audit.clone();
    let orphans = OrphanCheck::new(
        client,
        &node,
        volumes,
        controller.store(),
        metrics,
        context.orphan_audit.clone(),
    );
    let reconciles = controller
        .run(reconcile, error_policy, context)
        .for_each(|result| {
            match result {
                // Logged inside the reconcile's span.
                Ok(_) | Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::ObjectNotFound(object)) => {
                    tracing::debug!(%object, "LogicalVolume gone before its reconcile");
                }
                Err(err) => tracing::warn!(error = %err, "LogicalVolume controller"),
            }
            async {}
        });
    let audit_on_change = async move {
        while audit_changes.changed().await.is_ok() {
            wake.notify_one();
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = reconciles => tracing::info!("LogicalVolume controller stopped"),
        () = orphans.run() => {}
        () = audit_on_change => {}
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Method, Request, Response};
    use kube::client::Body;
    use lvmlocal_proto::MediaClass;
    use lvmlocal_proto::rpc::RpcMetrics;
    use lvmlocal_proto::volume::VolumeState;

    use super::*;
    use crate::api_mock::{answer, assert_apply, body};
    use crate::fake_lvm::{EXTENT, FakeLvm, local, object, object_json};
    use crate::lvm::LvmError;

    const GIB: u64 = 1 << 30;
    const OTHER_FINALIZER: &str = "backup.example.com/keep";

    fn deleting(mut lv: LogicalVolume, finalizers: &[&str]) -> LogicalVolume {
        lv.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-05-02T10:00:00Z".parse().unwrap(),
            ));
        lv.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        lv
    }

    fn with_intent(mut lv: LogicalVolume) -> LogicalVolume {
        lv.annotations_mut().insert(
            DELETE_INTENT.into(),
            "DeleteVolume through lvmlocal-controller; PersistentVolume pvc-1".into(),
        );
        lv
    }

    fn with_status(mut lv: LogicalVolume, status: LogicalVolumeStatus) -> LogicalVolume {
        lv.status = Some(status);
        lv
    }

    fn ready(size: u64, generation: i64) -> LogicalVolumeStatus {
        LogicalVolumeStatus {
            phase: LogicalVolumePhase::Ready,
            device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
            size_bytes: Some(size),
            message: None,
            observed_generation: Some(generation),
            condition: Some(VolumeCondition::healthy()),
            io_limits: None,
        }
    }

    fn request(size: u64, access: &str) -> VolumeRequest {
        VolumeRequest {
            id: "pvc-1".into(),
            media: MediaClass::Nvme,
            size_bytes: size,
            access: access.into(),
            pvc: Some("db/data-0".into()),
            thin: None,
            origin: None,
            snapshot: false,
        }
    }

    #[test]
    fn plan_covers_every_state_of_object_and_lv() {
        let lv = || object(GIB, 1);
        let nvme = local("pvc-1", MediaClass::Nvme, GIB);
        let larger = local("pvc-1", MediaClass::Nvme, GIB + EXTENT);
        let smaller = local("pvc-1", MediaClass::Nvme, GIB / 2);
        let on_hdd = local("pvc-1", MediaClass::Hdd, GIB);
        let other_node = {
            let mut lv = lv();
            lv.spec.node_name = "node-b".into();
            lv
        };
        let no_finalizer = {
            let mut lv = lv();
            lv.metadata.finalizers = None;
            lv
        };
        let block = {
            let mut lv = lv();
            lv.spec.fs_type = None;
            lv
        };
        let no_pvc = {
            let mut lv = lv();
            lv.spec.pvc = None;
            lv
        };
        let ntfs = {
            let mut lv = lv();
            lv.spec.fs_type = Some("ntfs".into());
            lv
        };
        let empty = {
            let mut lv = lv();
            lv.spec.size_bytes = 0;
            lv
        };
        let failed_no_space = LogicalVolumeStatus {
            phase: LogicalVolumePhase::Failed,
            message: Some("nvme: needs 1073741824 bytes, 0 free".into()),
            observed_generation: Some(1),
            ..LogicalVolumeStatus::default()
        };
        let lost = Failure {
            reason: "VolumeLost",
            message: "the LV /dev/lvmlocal-nvme/pvc-1 is gone from the node; \
                      a blank one is not made in its place"
                .into(),
            device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
            size_bytes: None,
        };
        let cases: Vec<(&str, LogicalVolume, Option<&LocalVolume>, Plan)> = vec![
            ("another node's", other_node, Some(&nvme), Plan::Leave),
            (
                "deleted, finalizer already gone",
                deleting(lv(), &[OTHER_FINALIZER]),
                Some(&nvme),
                Plan::Leave,
            ),
            (
                "deleted with its LV, on recorded intent",
                with_intent(deleting(lv(), &[LV_FINALIZER])),
                Some(&nvme),
                Plan::Remove { finalizer: 0 },
            ),
            (
                "deleted with its LV, without intent",
                deleting(lv(), &[LV_FINALIZER]),
                Some(&nvme),
                Plan::Keep { finalizer: 0 },
            ),
            (
                "deleted with a blank intent",
                {
                    let mut lv = deleting(lv(), &[LV_FINALIZER]);
                    lv.annotations_mut()
                        .insert(DELETE_INTENT.into(), "  ".into());
                    lv
                },
                Some(&nvme),
                Plan::Keep { finalizer: 0 },
            ),
            (
                "deleted, finalizer behind another",
                with_intent(deleting(lv(), &[OTHER_FINALIZER, LV_FINALIZER])),
                Some(&nvme),
                Plan::Remove { finalizer: 1 },
            ),
            (
                "deleted without intent, finalizer behind another",
                deleting(lv(), &[OTHER_FINALIZER, LV_FINALIZER]),
                Some(&nvme),
                Plan::Keep { finalizer: 1 },
            ),
            (
                "deleted, LV already removed",
                deleting(lv(), &[LV_FINALIZER, OTHER_FINALIZER]),
                None,
                Plan::Release { finalizer: 0 },
            ),
            (
                "deleted before it was ever made",
                deleting(with_status(lv(), failed_no_space.clone()), &[LV_FINALIZER]),
                None,
                Plan::Release { finalizer: 0 },
            ),
            ("no finalizer yet", no_finalizer, None, Plan::AddFinalizer),
            ("new", lv(), None, Plan::Ensure(request(GIB, "ext4"))),
            (
                "raw block",
                block,
                None,
                Plan::Ensure(request(GIB, "block")),
            ),
            (
                "no PVC",
                no_pvc,
                None,
                Plan::Ensure(VolumeRequest {
                    pvc: None,
                    ..request(GIB, "ext4")
                }),
            ),
            (
                "made, status not yet written",
                lv(),
                Some(&nvme),
                Plan::Report(nvme.clone()),
            ),
            (
                "made, rounded up to extents",
                with_status(lv(), ready(GIB + EXTENT, 1)),
                Some(&larger),
                Plan::Report(larger.clone()),
            ),
            (
                "spec grew",
                with_status(object(GIB, 2), ready(GIB / 2, 1)),
                Some(&smaller),
                Plan::Ensure(request(GIB, "ext4")),
            ),
            (
                "an LV of the same name on other media",
                lv(),
                Some(&on_hdd),
                Plan::Refuse(Failure {
                    reason: "OtherMedia",
                    message: "volume pvc-1 already exists on hdd media, not nvme".into(),
                    device_path: Some("/dev/lvmlocal-hdd/pvc-1".into()),
                    size_bytes: Some(GIB),
                }),
            ),
            (
                "made once, now gone",
                with_status(lv(), ready(GIB, 1)),
                None,
                Plan::Refuse(lost.clone()),
            ),
            (
                "reported lost, still gone",
                with_status(lv(), status(&lv(), &Outcome::Failed(lost.clone()), None)),
                None,
                Plan::Refuse(lost),
            ),
            (
                "did not fit before, tried again",
                with_status(lv(), failed_no_space),
                None,
                Plan::Ensure(request(GIB, "ext4")),
            ),
            (
                "unsupported filesystem",
                ntfs,
                None,
                Plan::Refuse(Failure {
                    reason: "InvalidSpec",
                    message: "LogicalVolume pvc-1: filesystem type \"ntfs\" is not supported; \
                              use ext4 or xfs"
                        .into(),
                    device_path: None,
                    size_bytes: None,
                }),
            ),
            (
                "zero size",
                empty,
                None,
                Plan::Refuse(Failure {
                    reason: "InvalidSpec",
                    message: "LogicalVolume pvc-1: spec.sizeBytes is 0".into(),
                    device_path: None,
                    size_bytes: None,
                }),
            ),
        ];
        for (case, lv, local, want) in cases {
            assert_eq!(plan(&lv, local, "node-a"), want, "{case}");
        }
        let mut bad_name = lv();
        bad_name.metadata.name = Some("Bad_Name".into());
        assert!(
            matches!(
                plan(&bad_name, None, "node-a"),
                Plan::Refuse(Failure {
                    reason: "InvalidSpec",
                    ..
                })
            ),
            "a name that is not a volume id"
        );
    }

    #[test]
    fn failures_say_what_is_left_of_the_volume() {
        let grown = local("pvc-1", MediaClass::Nvme, GIB);
        let no_space = VolumeError::NoSpace {
            media: MediaClass::Nvme,
            needed: 2 * GIB,
            free: GIB,
        };
        let cases = [
            (
                VolumeError::NoSpace {
                    media: MediaClass::Nvme,
                    needed: GIB,
                    free: 512 << 20,
                },
                None,
                Some(Failure {
                    reason: "NotEnoughSpace",
                    message: "nvme: needs 1073741824 bytes, 536870912 free".into(),
                    device_path: None,
                    size_bytes: None,
                }),
            ),
            (
                no_space,
                Some(&grown),
                Some(Failure {
                    reason: "NotEnoughSpace",
                    message: "nvme: needs 2147483648 bytes, 1073741824 free".into(),
                    device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
                    size_bytes: Some(GIB),
                }),
            ),
            (
                VolumeError::NoGroup(MediaClass::Ssd),
                None,
                Some(Failure {
                    reason: "NoVolumeGroup",
                    message: "this node has no ssd volume group".into(),
                    device_path: None,
                    size_bytes: None,
                }),
            ),
            (
                VolumeError::OtherMedia {
                    id: "pvc-1".into(),
                    existing: MediaClass::Hdd,
                    wanted: MediaClass::Nvme,
                },
                None,
                Some(Failure {
                    reason: "OtherMedia",
                    message: "volume pvc-1 already exists on hdd media, not nvme".into(),
                    device_path: None,
                    size_bytes: None,
                }),
            ),
            (
                VolumeError::Lvm(LvmError::Report {
                    command: "lvs".into(),
                    reason: "no JSON".into(),
                }),
                Some(&grown),
                None,
            ),
        ];
        for (err, existing, want) in cases {
            assert_eq!(Failure::of(&err, existing), want, "{err}");
        }
    }

    #[test]
    fn status_answers_the_current_generation_with_the_actual_size() {
        let lv = object(GIB, 3);
        let cases = [
            (
                Outcome::Ready(local("pvc-1", MediaClass::Nvme, GIB + EXTENT)),
                LogicalVolumeStatus {
                    phase: LogicalVolumePhase::Ready,
                    device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
                    size_bytes: Some(GIB + EXTENT),
                    message: None,
                    observed_generation: Some(3),
                    condition: Some(VolumeCondition::healthy()),
                    io_limits: None,
                },
            ),
            (
                Outcome::Failed(Failure {
                    reason: "NotEnoughSpace",
                    message: "nvme: needs 1073741824 bytes, 0 free".into(),
                    device_path: None,
                    size_bytes: None,
                }),
                LogicalVolumeStatus {
                    phase: LogicalVolumePhase::Failed,
                    device_path: None,
                    size_bytes: None,
                    message: Some("nvme: needs 1073741824 bytes, 0 free".into()),
                    observed_generation: Some(3),
                    condition: None,
                    io_limits: None,
                },
            ),
            (
                Outcome::Failed(Failure {
                    reason: "NotEnoughSpace",
                    message: "nvme: needs 536870912 bytes, 0 free".into(),
                    device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
                    size_bytes: Some(GIB / 2),
                }),
                LogicalVolumeStatus {
                    phase: LogicalVolumePhase::Failed,
                    device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
                    size_bytes: Some(GIB / 2),
                    message: Some("nvme: needs 536870912 bytes, 0 free".into()),
                    observed_generation: Some(3),
                    condition: None,
                    io_limits: None,
                },
            ),
            (
                Outcome::Failed(Failure::lost("/dev/lvmlocal-nvme/pvc-1".into())),
                LogicalVolumeStatus {
                    phase: LogicalVolumePhase::Failed,
                    device_path: Some("/dev/lvmlocal-nvme/pvc-1".into()),
                    size_bytes: None,
                    message: Some(Failure::lost("/dev/lvmlocal-nvme/pvc-1".into()).message),
                    observed_generation: Some(3),
                    condition: Some(VolumeCondition::abnormal(
                        "VolumeLost",
                        Failure::lost("/dev/lvmlocal-nvme/pvc-1".into()).message,
                    )),
                    io_limits: None,
                },
            ),
        ];
        for (outcome, want) in cases {
            assert_eq!(status(&lv, &outcome, None), want, "{outcome:?}");
        }
        let mut partial = local("pvc-1", MediaClass::Nvme, GIB);
        partial.healthy = false;
        let condition = status(&lv, &Outcome::Ready(partial), None)
            .condition
            .unwrap();
        assert!(condition.abnormal);
        assert_eq!(condition.reason, "VolumeUnhealthy");
        assert!(
            condition.message.contains("/dev/lvmlocal-nvme/pvc-1"),
            "{condition:?}"
        );
    }

    /// What the agent writes, read back the way the controller reads it.
    #[test]
    fn the_controller_reads_the_status_as_meant() {
        let lv = object(GIB, 2);
        let nvme = local("pvc-1", MediaClass::Nvme, GIB);
        let read = |outcome: Outcome| {
            let status = status(&lv, &outcome, None);
            volume_of(&with_status(lv.clone(), status)).unwrap().state
        };
        assert_eq!(
            read(Outcome::Ready(nvme.clone())),
            VolumeState::Ready { size_bytes: GIB }
        );
        let no_space = VolumeError::NoSpace {
            media: MediaClass::Nvme,
            needed: GIB,
            free: 0,
        };
        // Nothing was made: the controller forgets the object and retries elsewhere.
        assert_eq!(
            read(Outcome::Failed(Failure::of(&no_space, None).unwrap())),
            VolumeState::Failed {
                message: "nvme: needs 1073741824 bytes, 0 free".into(),
                lv_exists: false
            }
        );
        // A failed expansion or a lost LV: the object must stay.
        for failure in [
            Failure::of(&no_space, Some(&nvme)).unwrap(),
            Failure::lost("/dev/lvmlocal-nvme/pvc-1".into()),
        ] {
            let state = read(Outcome::Failed(failure));
            assert!(
                matches!(
                    state,
                    VolumeState::Failed {
                        lv_exists: true,
                        ..
                    }
                ),
                "{state:?}"
            );
        }
    }

    #[test]
    fn finalizer_patches_keep_the_others() {
        let mut lv = object(GIB, 1);
        lv.metadata.finalizers = None;
        assert_eq!(
            add_finalizer(&lv),
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [LV_FINALIZER]},
            ])
        );
        lv.metadata.finalizers = Some(vec![OTHER_FINALIZER.into()]);
        assert_eq!(
            add_finalizer(&lv),
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": [OTHER_FINALIZER]},
                {"op": "add", "path": "/metadata/finalizers/-", "value": LV_FINALIZER},
            ])
        );
        assert_eq!(
            drop_finalizer(1),
            json!([
                {"op": "test", "path": "/metadata/finalizers/1", "value": LV_FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/1"},
            ])
        );
    }

    #[test]
    fn only_a_change_of_health_is_told() {
        let healthy = VolumeCondition::healthy();
        let lost = VolumeCondition::abnormal("VolumeLost", "gone");
        let unhealthy = VolumeCondition::abnormal("VolumeUnhealthy", "partial");
        assert_eq!(turned(None, Some(&healthy)), None);
        assert_eq!(turned(Some(&healthy), Some(&healthy)), None);
        assert_eq!(turned(None, Some(&lost)), Some(&lost));
        assert_eq!(turned(Some(&healthy), Some(&lost)), Some(&lost));
        assert_eq!(turned(Some(&lost), Some(&lost)), None);
        assert_eq!(turned(Some(&unhealthy), Some(&lost)), Some(&lost));
        assert_eq!(turned(Some(&unhealthy), Some(&healthy)), Some(&healthy));
        assert_eq!(turned(Some(&lost), None), None);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let secs: Vec<u64> = [0, 1, 2, 3, 4, 8, 9, 10, 100, u32::MAX]
            .into_iter()
            .map(|failures| backoff(failures).as_secs())
            .collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 128, 256, 300, 300, 300]);
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context(backend: FakeLvm) -> (Arc<Context<FakeLvm>>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Arc::new(Metrics::new(&RpcMetrics::default()));
        let client = Client::new(service, "default");
        (
            Arc::new(Context::new(
                client,
                "node-a",
                Arc::new(backend),
                Arc::new(IoLimiter::new(
                    "/nonexistent/cgroup".into(),
                    "/nonexistent/records".into(),
                    metrics.clone(),
                )),
                metrics,
            )),
            handle,
        )
    }

    /// A JSON patch of the object's finalizers by the agent's field manager.
    fn assert_finalizer_patch(request: &Request<Body>) {
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().path(),
            "/apis/lvmlocal.io/v1alpha1/logicalvolumes/pvc-1"
        );
        assert_eq!(
            request.headers()["content-type"],
            "application/json-patch+json"
        );
        assert_eq!(request.uri().query(), Some("&fieldManager=lvmlocal-agent"));
    }

    fn assert_status_apply(request: &Request<Body>) {
        assert_apply(
            request,
            "/apis/lvmlocal.io/v1alpha1/logicalvolumes/pvc-1/status",
        );
    }

    /// A new object: the LV is made at the spec's size and the status says
    /// so, once; a second reconcile of the answered object sends nothing.
    #[tokio::test]
    async fn a_new_object_gets_its_lv_and_a_ready_status() {
        let (ctx, handle) = context(FakeLvm::new(10 * GIB));
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("status applied");
            assert_status_apply(&request);
            let applied = body(request).await;
            assert_eq!(
                applied,
                json!({
                    "apiVersion": "lvmlocal.io/v1alpha1",
                    "kind": "LogicalVolume",
                    "status": {
                        "phase": "Ready",
                        "devicePath": "/dev/lvmlocal-nvme/pvc-1",
                        "sizeBytes": 1073741824u64,
                        "observedGeneration": 1,
                        "condition": {"abnormal": false, "reason": "Healthy", "message": "healthy"},
                    },
                })
            );
            let mut answered = object_json(GIB, 1);
            answered["status"] = applied["status"].clone();
            answer(send, &answered);
            answered
        });

        let action = reconcile(Arc::new(object(GIB, 1)), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(RECHECK));
        let answered = api_server.await.unwrap();
        assert_eq!(
            ctx.volumes.calls(),
            ["get pvc-1", "ensure pvc-1 nvme 1073741824 ext4 db/data-0"]
        );

        // The mock answers no more: any request would fail this reconcile.
        let answered: LogicalVolume = serde_json::from_value(answered).unwrap();
        let action = reconcile(Arc::new(answered), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(RECHECK));
        assert_eq!(ctx.volumes.calls().len(), 3, "only a look at the LV");
        assert!(
            ctx.metrics
                .encode()
                .contains("lvmlocal_agent_reconciles_total 2")
        );
    }

    /// After a restart the LV is found by its tags and reported, not made again.
    #[tokio::test]
    async fn an_lv_made_before_a_restart_is_reported_not_made_again() {
        let made = local("pvc-1", MediaClass::Nvme, GIB + EXTENT);
        let (ctx, handle) = context(FakeLvm::new(0).with(made));
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("status applied");
            assert_status_apply(&request);
            let applied = body(request).await;
            assert_eq!(applied["status"]["phase"], "Ready");
            assert_eq!(applied["status"]["sizeBytes"], GIB + EXTENT);
            answer(send, &object_json(GIB, 1));
        });
        reconcile(Arc::new(object(GIB, 1)), ctx.clone())
            .await
            .unwrap();
        api_server.await.unwrap();
        assert_eq!(ctx.volumes.calls(), ["get pvc-1"]);
    }

    /// A list of PersistentVolumes; `handles` are the volume handles of
    /// lvmlocal PVs in it.
    fn pv_list(handles: &[&str]) -> Value {
        let items: Vec<Value> = handles
            .iter()
            .map(|handle| {
                json!({
                    "metadata": {"name": format!("pv-of-{handle}")},
                    "spec": {"csi": {"driver": "lvmlocal.io", "volumeHandle": handle}},
                })
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "PersistentVolumeList", "metadata": {}, "items": items})
    }

    fn assert_pv_list(request: &Request<Body>) {
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), "/api/v1/persistentvolumes");
    }

    /// Deleted on recorded intent with other finalizers beside ours, and no
    /// PV left: the LV goes, then only our finalizer is dropped.
    #[tokio::test]
    async fn a_deleted_object_loses_its_lv_then_only_our_finalizer() {
        let (ctx, handle) = context(FakeLvm::new(0).with(local("pvc-1", MediaClass::Nvme, GIB)));
        let lv = with_intent(deleting(
            with_status(object(GIB, 1), ready(GIB, 1)),
            &[OTHER_FINALIZER, LV_FINALIZER],
        ));
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("PVs listed");
            assert_pv_list(&request);
            // Another volume's PV does not hold this one back.
            answer(send, &pv_list(&["pvc-2"]));
            let (request, send) = handle.next_request().await.expect("finalizer dropped");
            assert_finalizer_patch(&request);
            assert_eq!(
                body(request).await,
                json!([
                    {"op": "test", "path": "/metadata/finalizers/1", "value": LV_FINALIZER},
                    {"op": "remove", "path": "/metadata/finalizers/1"},
                ])
            );
            let mut left = object_json(GIB, 1);
            left["metadata"]["finalizers"] = json!([OTHER_FINALIZER]);
            left["metadata"]["deletionTimestamp"] = json!("2025-05-02T10:00:00Z");
            answer(send, &left);
        });
        let action = reconcile(Arc::new(lv), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        api_server.await.unwrap();
        assert_eq!(ctx.volumes.calls(), ["get pvc-1", "remove pvc-1"]);
        assert!(ctx.volumes.ids().is_empty());
    }

    /// Deleted on intent while its PV still exists: nothing is removed, the
    /// wait is announced once and the object looked at again soon.
    #[tokio::test]
    async fn a_deletion_waits_while_a_pv_names_the_volume() {
        let (ctx, handle) = context(FakeLvm::new(0).with(local("pvc-1", MediaClass::Nvme, GIB)));
        let lv = Arc::new(with_intent(deleting(
            with_status(object(GIB, 1), ready(GIB, 1)),
            &[LV_FINALIZER],
        )));
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("PVs listed");
            assert_pv_list(&request);
            answer(send, &pv_list(&["pvc-1"]));
            let (request, send) = handle.next_request().await.expect("event");
            assert_eq!(request.method(), Method::POST);
            let event = body(request).await;
            assert_eq!(event["reason"], "WaitingForPersistentVolume");
            assert!(event["note"].as_str().unwrap().contains("pv-of-pvc-1"));
            answer(send, &event);
            // The second look: still there, and no second event.
            let (request, send) = handle.next_request().await.expect("PVs listed again");
            assert_pv_list(&request);
            answer(send, &pv_list(&["pvc-1"]));
        });
        for _ in 0..2 {
            let action = reconcile(lv.clone(), ctx.clone()).await.unwrap();
            assert_eq!(action, Action::requeue(WAIT_FOR_PV));
        }
        api_server.await.unwrap();
        assert_eq!(ctx.volumes.calls(), ["get pvc-1", "get pvc-1"]);
        assert_eq!(ctx.volumes.ids(), ["pvc-1"]);
    }

    /// Deleted without a recorded intent (a bare `kubectl delete`, a prune,
    /// the CRD removed): the LV and its data stay, the object is let go,
    /// a warning says so and the orphan audit is woken.
    #[tokio::test]
    async fn a_deletion_without_intent_keeps_the_lv() {
        let (ctx, handle) = context(FakeLvm::new(0).with(local("pvc-1", MediaClass::Nvme, GIB)));
        let lv = deleting(with_status(object(GIB, 1), ready(GIB, 1)), &[LV_FINALIZER]);
        let woken = ctx.orphan_audit.clone();
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("event");
            assert_eq!(request.method(), Method::POST);
            let event = body(request).await;
            assert_eq!(event["reason"], "DeletedWithoutIntent");
            assert_eq!(event["type"], "Warning");
            assert!(
                event["note"]
                    .as_str()
                    .unwrap()
                    .contains("/dev/lvmlocal-nvme/pvc-1")
            );
            answer(send, &event);
            let (request, send) = handle.next_request().await.expect("finalizer dropped");
            assert_finalizer_patch(&request);
            assert_eq!(
                body(request).await,
                json!([
                    {"op": "test", "path": "/metadata/finalizers/0", "value": LV_FINALIZER},
                    {"op": "remove", "path": "/metadata/finalizers/0"},
                ])
            );
            answer(send, &object_json(GIB, 1));
        });
        let action = reconcile(Arc::new(lv), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        api_server.await.unwrap();
        assert_eq!(ctx.volumes.calls(), ["get pvc-1"], "nothing removed");
        assert_eq!(ctx.volumes.ids(), ["pvc-1"]);
        tokio::time::timeout(Duration::from_secs(1), woken.notified())
            .await
            .expect("the orphan audit is woken");
    }

    /// The controller sets the finalizer at creation; an object without
    /// one gets it before any LV is made.
    #[tokio::test]
    async fn an_object_without_the_finalizer_gets_it_first() {
        let (ctx, handle) = context(FakeLvm::new(10 * GIB));
        let mut lv = object(GIB, 1);
        lv.metadata.finalizers = None;
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("finalizer added");
            assert_finalizer_patch(&request);
            assert_eq!(
                body(request).await,
                json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": [LV_FINALIZER]},
                ])
            );
            answer(send, &object_json(GIB, 1));
        });
        let action = reconcile(Arc::new(lv), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        api_server.await.unwrap();
        assert_eq!(ctx.volumes.calls(), ["get pvc-1"]);
    }

    /// Not enough space: status Failed with LVM's numbers, a Warning event,
    /// the failure counted, and nothing made.
    #[tokio::test]
    async fn no_space_fails_the_volume_and_makes_nothing() {
        let (ctx, handle) = context(FakeLvm::new(512 << 20));
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("status applied");
            assert_status_apply(&request);
            let applied = body(request).await;
            assert_eq!(
                applied["status"],
                json!({
                    "phase": "Failed",
                    "message": "nvme: needs 1073741824 bytes, 536870912 free",
                    "observedGeneration": 1,
                })
            );
            let mut answered = object_json(GIB, 1);
            answered["status"] = applied["status"].clone();
            answer(send, &answered);

            let (request, send) = handle.next_request().await.expect("event recorded");
            assert_eq!(request.method(), Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/default/events"
            );
            let event = body(request).await;
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "NotEnoughSpace");
            assert_eq!(event["action"], "Provision");
            assert_eq!(
                event["note"],
                "nvme: needs 1073741824 bytes, 536870912 free"
            );
            assert_eq!(event["regarding"]["kind"], "LogicalVolume");
            assert_eq!(event["regarding"]["name"], "pvc-1");
            assert_eq!(event["reportingController"], "lvmlocal-agent");
            assert_eq!(event["reportingInstance"], "node-a");
            answer(send, &event);
        });
        let action = reconcile(Arc::new(object(GIB, 1)), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(RETRY_FAILED));
        api_server.await.unwrap();
        assert!(ctx.volumes.ids().is_empty(), "nothing was made");
        assert!(
            ctx.metrics
                .encode()
                .contains("lvmlocal_agent_reconcile_failures_total{error=\"NotEnoughSpace\"} 1"),
            "{}",
            ctx.metrics.encode()
        );
    }

    /// LVM failing is not the volume's fate: no status is written, a
    /// Warning event is, and the object is retried with a growing wait.
    #[tokio::test]
    async fn lvm_failing_is_retried_with_backoff() {
        let broken = FakeLvm {
            broken: true,
            ..FakeLvm::new(10 * GIB)
        };
        let (ctx, handle) = context(broken);
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("event recorded");
            assert_eq!(request.method(), Method::POST);
            let event = body(request).await;
            assert_eq!(event["reason"], "LvmFailed");
            assert_eq!(event["action"], "Inspect");
            assert_eq!(event["note"], "parsing the report of `lvs`: no JSON");
            answer(send, &event);
        });
        let lv = Arc::new(object(GIB, 1));
        let err = reconcile(lv.clone(), ctx.clone()).await.unwrap_err();
        api_server.await.unwrap();
        assert_eq!(err.reason(), "LvmFailed");
        let waits: Vec<Action> = (0..3)
            .map(|_| error_policy(lv.clone(), &err, ctx.clone()))
            .collect();
        assert_eq!(
            waits,
            [1, 2, 4].map(|secs| Action::requeue(Duration::from_secs(secs)))
        );
        assert!(
            ctx.metrics
                .encode()
                .contains("lvmlocal_agent_reconcile_failures_total{error=\"LvmFailed\"} 1")
        );
    }
}
