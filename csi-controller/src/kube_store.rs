//! The cluster's store: one `LogicalVolume` object per volume, named by its
//! id, carried out by the agent of its node; `NodeLocalStorage` for the
//! capacity of each node. Reads that decide idempotency go to the API
//! server; waiting, listing and capacity use the watch caches.

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::ObjectMeta;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{
    DELETE_INTENT, LV_FINALIZER, LogicalVolume, LogicalVolumeSpec, SnapshotSpec, ThinSpec,
};
use lvmlocal_proto::io_limits::IoLimits;
use lvmlocal_proto::logical_volume::{delete_intent, persistent_volumes_naming, volume_of};
use lvmlocal_proto::params::{ON_NODE_LOSS, OnNodeLoss};
use lvmlocal_proto::placement::NodeCapacity;
use lvmlocal_proto::store::{Store, StoreError};
use lvmlocal_proto::volume::{NewVolume, Volume, VolumeId};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::caches::Caches;
use crate::capacity::capacities;

/// How long DeleteVolume waits for the watch to show its deletion.
const CACHE_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// How many times DeleteVolume reads and judges an object that keeps
/// changing under it before it answers UNAVAILABLE.
const DELETE_ATTEMPTS: u32 = 3;

/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "lvmlocal-controller";

/// What publishes the controller's events, under its name.
pub fn recorder(client: Client) -> Recorder {
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: None,
    };
    Recorder::new(client, reporter)
}

/// Publishes an event about `regarding`; an event lost is only logged, as
/// the action it tells of is already done or decided.
pub async fn tell(recorder: &Recorder, regarding: &ObjectReference, event: Event) {
    if let Err(err) = recorder.publish(&event, regarding).await {
        tracing::warn!(error = %err, reason = %event.reason, "cannot record event");
    }
}

/// The Kubernetes [`Store`].
#[derive(Clone)]
pub struct KubeStore {
    api: Api<LogicalVolume>,
    pvs: Api<PersistentVolume>,
    caches: Caches,
}

impl KubeStore {
    pub fn new(client: Client, caches: Caches) -> Self {
        Self {
            api: Api::all(client.clone()),
            pvs: Api::all(client),
            caches,
        }
    }

    /// Records on `lv` that DeleteVolume asked for its removal, and for
    /// which PersistentVolume; refused if `lv` changed since it was read.
    /// Returns the object as written.
    /// Merges `spec` into the spec of `volume`'s object; `what` names the
    /// change in an error.
    async fn patch_spec(
        &self,
        volume: &Volume,
        spec: Value,
        what: &str,
    ) -> Result<Volume, StoreError> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let lv = self
            .api
            .patch(
                volume.id.as_str(),
                &params,
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .map_err(|err| {
                StoreError::unavailable(format!("cannot {what} LogicalVolume {}", volume.id), err)
            })?;
        volume_of(&lv)
    }

    /// Asks for the deletion of `id`, judged on the object as read. The
    /// object changing meanwhile (its agent writes the status) is a
    /// conflict: it is read and judged again, a few times, before the
    /// caller is told to retry.
    async fn request_deletion(&self, id: &VolumeId) -> Result<(), StoreError> {
        let mut attempt = 1;
        loop {
            match self.try_deletion(id).await {
                Err((context, kube::Error::Api(status)))
                    if status.code == 409 && attempt < DELETE_ATTEMPTS =>
                {
                    tracing::debug!(%context, attempt, "changed since read; reading it again");
                    attempt += 1;
                }
                Err((context, err)) => return Err(StoreError::unavailable(context, err)),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn try_deletion(&self, id: &VolumeId) -> Result<(), (String, kube::Error)> {
        let Some(mut lv) = self
            .api
            .get_opt(id.as_str())
            .await
            .map_err(|err| (format!("cannot read LogicalVolume {id}"), err))?
        else {
            return Ok(());
        };
        if delete_intent(&lv).is_none() {
            let pvs = persistent_volumes_naming(&self.pvs, id.as_str())
                .await
                .map_err(|err| (format!("cannot list the PersistentVolumes of {id}"), err))?;
            lv = record_intent(&self.api, &lv, &intent(&pvs))
                .await
                .map_err(|err| {
                    (
                        format!("cannot record the deletion intent on LogicalVolume {id}"),
                        err,
                    )
                })?;
        }
        if lv.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        delete_as_read(&self.api, &lv)
            .await
            .map_err(|err| (format!("cannot delete LogicalVolume {id}"), err))
    }

    /// Waits a little for the watch to show `id` being deleted or gone; past
    /// that the deletion stands all the same, and the cache catches up.
    async fn caches_see_deleting(&self, id: &VolumeId) {
        let deadline = Instant::now() + CACHE_CATCH_UP;
        let mut changes = self.caches.changes();
        loop {
            changes.borrow_and_update();
            let deleting = self
                .caches
                .volume(id.as_str())
                .is_none_or(|lv| lv.metadata.deletion_timestamp.is_some());
            if deleting {
                return;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    tracing::debug!(volume = %id, "the caches have not seen the deletion yet");
                    return;
                }
            }
        }
    }
}

/// Records on `lv` who asks for its deletion and why, the evidence the
/// admission policy and the agent look for; refused if `lv` changed since
/// it was read. Returns the object as written.
pub async fn record_intent(
    api: &Api<LogicalVolume>,
    lv: &LogicalVolume,
    intent: &str,
) -> Result<LogicalVolume, kube::Error> {
    let patch = json!({
        "metadata": {
            "resourceVersion": lv.resource_version(),
            "annotations": { DELETE_INTENT: intent },
        }
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch(&lv.name_any(), &params, &Patch::Merge(&patch))
        .await
}

/// Deletes `lv` if it is still the object as read, intent included; gone
/// already is not an error.
pub async fn delete_as_read(
    api: &Api<LogicalVolume>,
    lv: &LogicalVolume,
) -> Result<(), kube::Error> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: lv.uid(),
            resource_version: lv.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&lv.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(err) => Err(err),
    }
}

/// The deletion intent DeleteVolume records: who asked, for which PVs.
fn intent(pvs: &[String]) -> String {
    match pvs {
        [] => "DeleteVolume through lvmlocal-controller; no PersistentVolume".to_owned(),
        pvs => format!(
            "DeleteVolume through lvmlocal-controller; PersistentVolume {}",
            pvs.join(", ")
        ),
    }
}

impl Store for KubeStore {
    async fn get(&self, id: &VolumeId) -> Result<Option<Volume>, StoreError> {
        let lv = self.api.get_opt(id.as_str()).await.map_err(|err| {
            StoreError::unavailable(format!("cannot read LogicalVolume {id}"), err)
        })?;
        lv.as_ref().map(volume_of).transpose()
    }

    async fn create(&self, new: NewVolume) -> Result<Volume, StoreError> {
        let lv = LogicalVolume {
            metadata: ObjectMeta {
                name: Some(new.id.to_string()),
                // Set from the first moment, so no deletion can slip in
                // before the agent has seen the object and made the LV.
                finalizers: Some(vec![LV_FINALIZER.to_owned()]),
                annotations: (new.on_node_loss == OnNodeLoss::Recreate)
                    .then(|| [(ON_NODE_LOSS.to_owned(), OnNodeLoss::Recreate.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: LogicalVolumeSpec {
                node_name: new.node,
                media: new.media,
                size_bytes: new.size_bytes,
                fs_type: new.access.fs_type().map(|fs| fs.to_string()),
                pvc: new.pvc,
                io_limits: (!new.io_limits.is_none()).then_some(new.io_limits),
                thin: new.thin.map(|ratio| ThinSpec {
                    overprovision_percent: ratio.percent(),
                }),
                snapshot: new
                    .snapshot_of
                    .map(|(source, volume_snapshot)| SnapshotSpec {
                        source_volume: source.to_string(),
                        volume_snapshot,
                    }),
                source: new.source,
            },
            status: None,
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match self.api.create(&params, &lv).await {
            Ok(created) => volume_of(&created),
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                // Another call made it first (or this one, before a crash).
                self.get(&new.id).await?.ok_or_else(|| {
                    StoreError::unavailable(
                        format!("LogicalVolume {} vanished right after a conflict", new.id),
                        "retry",
                    )
                })
            }
            Err(err) => Err(StoreError::unavailable(
                format!("cannot create LogicalVolume {}", new.id),
                err,
            )),
        }
    }

    async fn wait(&self, volume: &Volume, deadline: Instant) -> Result<Volume, StoreError> {
        let started = Instant::now();
        let mut changes = self.caches.changes();
        loop {
            changes.borrow_and_update();
            if let Some(lv) = self.caches.volume(volume.id.as_str()) {
                let seen = volume_of(&lv)?;
                // An older generation in the cache says nothing about the
                // request the caller just made.
                if seen.generation >= volume.generation && seen.settled() {
                    return Ok(seen);
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(closed)) => {
                    return Err(StoreError::unavailable(
                        "the LogicalVolume watch has stopped",
                        closed,
                    ));
                }
                Err(_) => {
                    return Err(StoreError::Timeout {
                        id: volume.id.clone(),
                        waited: started.elapsed(),
                    });
                }
            }
        }
    }

    /// Records the deletion intent, then deletes the object it was recorded
    /// on. The agent removes the LV once no PersistentVolume names it, so
    /// the provisioner, which deletes the PV after this call, is not waited
    /// for here; the caches are, so that a ListVolumes that follows does not
    /// list the volume.
    async fn delete(&self, id: &VolumeId) -> Result<(), StoreError> {
        self.request_deletion(id).await?;
        self.caches_see_deleting(id).await;
        Ok(())
    }

    async fn resize(&self, volume: &Volume, size_bytes: u64) -> Result<Volume, StoreError> {
        self.patch_spec(volume, json!({ "sizeBytes": size_bytes }), "resize")
            .await
    }

    async fn modify(&self, volume: &Volume, io_limits: IoLimits) -> Result<Volume, StoreError> {
        // A merge patch merges objects: every limit is named, an absent one
        // as null, so that the limits become exactly these.
        let limits = if io_limits.is_none() {
            Value::Null
        } else {
            json!({
                "readIops": io_limits.read_iops,
                "writeIops": io_limits.write_iops,
                "readBps": io_limits.read_bps,
                "writeBps": io_limits.write_bps,
            })
        };
        self.patch_spec(
            volume,
            json!({ "ioLimits": limits }),
            "change the IO limits of",
        )
        .await
    }

    async fn list(
        &self,
        after: Option<&VolumeId>,
        limit: usize,
        snapshots: bool,
    ) -> Result<Vec<Volume>, StoreError> {
        let mut volumes: Vec<Volume> = self
            .caches
            .volumes()
            .iter()
            .filter(|lv| lv.metadata.deletion_timestamp.is_none())
            .filter_map(|lv| match volume_of(lv) {
                Ok(volume) => Some(volume),
                Err(err) => {
                    tracing::warn!(error = %err, "skipping a LogicalVolume in ListVolumes");
                    None
                }
            })
            .filter(|volume| volume.snapshot_of.is_some() == snapshots)
            .filter(|volume| after.is_none_or(|after| &volume.id > after))
            .collect();
        volumes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        volumes.truncate(limit);
        Ok(volumes)
    }

    async fn capacities(&self, media: MediaClass) -> Result<Vec<NodeCapacity>, StoreError> {
        let now = std::time::Instant::now();
        Ok(capacities(
            media,
            &self.caches.storage(),
            &self.caches.volumes(),
            &self.caches.node_names(),
            |node| {
                self.caches
                    .silence(node, now)
                    .map(|silence| silence.to_string())
            },
        ))
    }
}
