//! A stand-in for LVM and the objects the controller makes, for the
//! Kubernetes-side tests of the reconciler and the orphan audit.

use std::collections::BTreeMap;
use std::sync::Mutex;

use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{LV_FINALIZER, LogicalVolume, MediaBytes};
use serde_json::{Value, json};

use crate::lvm::LvmError;
use crate::volumes::{GroupUse, LocalVolume, VolumeBackend, VolumeError, VolumeRequest};

pub const EXTENT: u64 = 4 << 20;

/// A stand-in for LVM in the Kubernetes-side tests only: it keeps LVs
/// in a map, rounds sizes to extents, runs out of space at `free`, and
/// records every call. LVM itself is tested in the VM.
pub struct FakeLvm {
    pub volumes: Mutex<BTreeMap<String, LocalVolume>>,
    pub free: Mutex<u64>,
    /// Bytes LVs that are not lvmlocal's take in each group.
    pub other: Mutex<MediaBytes>,
    /// Every LV command fails as LVM failing would.
    pub broken: bool,
    pub calls: Mutex<Vec<String>>,
}

impl FakeLvm {
    pub fn new(free: u64) -> Self {
        Self {
            volumes: Mutex::default(),
            free: Mutex::new(free),
            other: Mutex::default(),
            broken: false,
            calls: Mutex::default(),
        }
    }

    pub fn with(self, volume: LocalVolume) -> Self {
        self.volumes
            .lock()
            .unwrap()
            .insert(volume.id.clone(), volume);
        self
    }

    fn call(&self, call: String) -> Result<(), VolumeError> {
        self.calls.lock().unwrap().push(call);
        if self.broken {
            return Err(VolumeError::Lvm(LvmError::Report {
                command: "lvs".into(),
                reason: "no JSON".into(),
            }));
        }
        Ok(())
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn ids(&self) -> Vec<String> {
        self.volumes.lock().unwrap().keys().cloned().collect()
    }
}

impl VolumeBackend for FakeLvm {
    async fn list(&self) -> Result<Vec<LocalVolume>, VolumeError> {
        self.call("list".into())?;
        Ok(self.volumes.lock().unwrap().values().cloned().collect())
    }

    async fn get(&self, id: &str) -> Result<Option<LocalVolume>, VolumeError> {
        self.call(format!("get {id}"))?;
        Ok(self.volumes.lock().unwrap().get(id).cloned())
    }

    async fn ensure(&self, request: &VolumeRequest) -> Result<LocalVolume, VolumeError> {
        self.call(format!(
            "ensure {} {} {} {} {}",
            request.id,
            request.media,
            request.size_bytes,
            request.access,
            request.pvc.as_deref().unwrap_or("-")
        ))?;
        let mut volumes = self.volumes.lock().unwrap();
        let mut free = self.free.lock().unwrap();
        let mut volume = volumes
            .get(&request.id)
            .cloned()
            .unwrap_or_else(|| local(&request.id, request.media, 0));
        let size = request.size_bytes.div_ceil(EXTENT) * EXTENT;
        if size > volume.size_bytes {
            let needed = size - volume.size_bytes;
            if needed > *free {
                return Err(VolumeError::NoSpace {
                    media: request.media,
                    needed,
                    free: *free,
                });
            }
            *free -= needed;
            volume.size_bytes = size;
            volume.requested_bytes = request.size_bytes;
        }
        volumes.insert(request.id.clone(), volume.clone());
        Ok(volume)
    }

    async fn remove(&self, id: &str) -> Result<(), VolumeError> {
        self.call(format!("remove {id}"))?;
        self.volumes.lock().unwrap().remove(id);
        Ok(())
    }

    async fn usage(&self) -> Result<Vec<(MediaClass, GroupUse)>, VolumeError> {
        let volumes = self.volumes.lock().unwrap();
        Ok(MediaClass::ALL
            .into_iter()
            .map(|media| {
                let usage = GroupUse {
                    volumes: volumes
                        .values()
                        .filter(|volume| volume.media == media)
                        .map(|volume| (volume.id.clone(), volume.size_bytes))
                        .collect(),
                    other_bytes: self.other.lock().unwrap().get(media),
                    pool: None,
                };
                (media, usage)
            })
            .collect())
    }

    async fn tend_pools(&self) -> Result<Vec<String>, VolumeError> {
        Ok(Vec::new())
    }
}

pub fn local(id: &str, media: MediaClass, size_bytes: u64) -> LocalVolume {
    LocalVolume {
        id: id.into(),
        media,
        vg: format!("lvmlocal-{media}"),
        size_bytes,
        requested_bytes: size_bytes,
        access: "ext4".into(),
        pvc: Some("db/data-0".into()),
        device_path: format!("/dev/lvmlocal-{media}/{id}"),
        healthy: true,
        dm_name: None,
        kernel_errors: None,
        thin: None,
        origin: None,
        snapshot: false,
    }
}

/// A `LogicalVolume` as the controller creates it, as the API server
/// returns it.
pub fn object_json(size: u64, generation: i64) -> Value {
    json!({
        "apiVersion": "lvmlocal.io/v1alpha1",
        "kind": "LogicalVolume",
        "metadata": {
            "name": "pvc-1",
            "uid": "0c3e5f2a-8d6b-4c1e-9f7a-2b4d6e8f0a1c",
            "resourceVersion": "4711",
            "generation": generation,
            "creationTimestamp": "2025-05-01T10:00:00Z",
            "finalizers": [LV_FINALIZER],
        },
        "spec": {
            "nodeName": "node-a",
            "media": "nvme",
            "sizeBytes": size,
            "fsType": "ext4",
            "pvc": {"namespace": "db", "name": "data-0"},
        },
    })
}

pub fn object(size: u64, generation: i64) -> LogicalVolume {
    serde_json::from_value(object_json(size, generation)).unwrap()
}
