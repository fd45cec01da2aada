//! What a pod asks of lvmlocal: its claims that are not bound yet and whose
//! StorageClass lvmlocal provisions, with the media class and size of each.
//! Bound claims need nothing from the extender: their volume exists and its
//! node affinity already pins the pod.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use lvmlocal_proto::params::Placement;
use lvmlocal_proto::thin::Ratio;
use lvmlocal_proto::validate::{self, Invalid, Parameters};
use lvmlocal_proto::{DRIVER_NAME, MediaClass};

use crate::quantity::parse_bytes;

/// Set by kube-scheduler on a claim once it has picked the pod's node.
pub const SELECTED_NODE_ANNOTATION: &str = "volume.kubernetes.io/selected-node";
/// Marks the StorageClass used by claims that name none.
pub const DEFAULT_CLASS_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";

/// A PersistentVolumeClaim, as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClaimKey(Box<str>);

impl ClaimKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ClaimKey(format!("{namespace}/{name}").into_boxed_str())
    }

    /// `(namespace, name)`.
    pub fn parts(&self) -> (&str, &str) {
        self.0.split_once('/').unwrap_or(("", &self.0))
    }

    pub fn of(claim: &PersistentVolumeClaim) -> Self {
        ClaimKey::new(
            claim.metadata.namespace.as_deref().unwrap_or_default(),
            claim.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

impl fmt::Display for ClaimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the extender keeps of a claim: little, since a cluster has as many
/// claims as volumes and the cache must stay small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimState {
    Bound,
    Pending(PendingClaim),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingClaim {
    pub storage_class: Option<Box<str>>,
    /// `spec.resources.requests.storage`; `None` when absent or unreadable.
    pub bytes: Option<u64>,
    /// The node kube-scheduler picked, once it has.
    pub selected_node: Option<Box<str>>,
    /// What its content is copied from: it can only be made on that node.
    pub origin: Option<Origin>,
}

/// Where a claim's content comes from (`spec.dataSourceRef`, or
/// `spec.dataSource`): another claim (a clone) or a VolumeSnapshot (a
/// restore), by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    Claim(ClaimKey),
    Snapshot(ClaimKey),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Claim(key) => write!(f, "claim {key}"),
            Origin::Snapshot(key) => write!(f, "VolumeSnapshot {key}"),
        }
    }
}

/// The origin a claim's data source names, if it is one lvmlocal copies.
fn origin(namespace: &str, spec: &PersistentVolumeClaimSpec) -> Option<Origin> {
    let (group, kind, name, source_namespace) = match (&spec.data_source_ref, &spec.data_source) {
        (Some(source), _) => (
            source.api_group.as_deref(),
            source.kind.as_str(),
            source.name.as_str(),
            source.namespace.as_deref(),
        ),
        (None, Some(source)) => (
            source.api_group.as_deref(),
            source.kind.as_str(),
            source.name.as_str(),
            None,
        ),
        (None, None) => return None,
    };
    let key = ClaimKey::new(source_namespace.unwrap_or(namespace), name);
    match (group.unwrap_or_default(), kind) {
        ("", "PersistentVolumeClaim") => Some(Origin::Claim(key)),
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => Some(Origin::Snapshot(key)),
        _ => None,
    }
}

impl ClaimState {
    pub fn of(claim: &PersistentVolumeClaim) -> Self {
        let spec = claim.spec.as_ref();
        let bound_to_volume = spec
            .and_then(|spec| spec.volume_name.as_deref())
            .is_some_and(|volume| !volume.is_empty());
        let phase_bound = claim
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            == Some("Bound");
        if bound_to_volume || phase_bound {
            return ClaimState::Bound;
        }
        ClaimState::Pending(PendingClaim {
            storage_class: spec
                .and_then(|spec| spec.storage_class_name.as_deref())
                .map(Box::from),
            bytes: spec.and_then(requested_bytes),
            selected_node: claim
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(SELECTED_NODE_ANNOTATION))
                .map(|node| Box::from(node.as_str())),
            origin: spec.and_then(|spec| {
                origin(
                    claim.metadata.namespace.as_deref().unwrap_or_default(),
                    spec,
                )
            }),
        })
    }
}

fn requested_bytes(spec: &PersistentVolumeClaimSpec) -> Option<u64> {
    let storage = spec.resources.as_ref()?.requests.as_ref()?.get("storage")?;
    parse_bytes(&storage.0).ok()
}

/// What the extender keeps of a StorageClass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassRecord {
    pub kind: ClassKind,
    /// Marked as the default class.
    pub default: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassKind {
    /// Provisioned by another driver.
    Foreign,
    Lvmlocal {
        media: MediaClass,
        placement: Option<Placement>,
        /// The overprovisioning ratio of a thin class.
        thin: Option<Ratio>,
    },
    /// An lvmlocal class whose parameters are wrong; the text says how.
    Invalid(String),
}

impl ClassRecord {
    pub fn of(class: &StorageClass) -> Self {
        let default = class
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(DEFAULT_CLASS_ANNOTATION))
            .is_some_and(|value| value == "true");
        let kind = if class.provisioner != DRIVER_NAME {
            ClassKind::Foreign
        } else {
            // The rule CreateVolume applies: a class it would refuse is
            // refused here already, with the same reason.
            let no_parameters = BTreeMap::new();
            match validate::parameters(class.parameters.as_ref().unwrap_or(&no_parameters)) {
                Ok(
                    params @ Parameters {
                        media: Some(media),
                        placement,
                        ..
                    },
                ) => ClassKind::Lvmlocal {
                    media,
                    placement,
                    thin: params.thin(),
                },
                Ok(_) => ClassKind::Invalid(Invalid::MissingMedia.to_string()),
                Err(invalid) => ClassKind::Invalid(invalid.to_string()),
            }
        };
        ClassRecord { kind, default }
    }
}

/// The claims and classes the extender has cached.
pub trait Catalog {
    fn claim(&self, key: &ClaimKey) -> Option<&ClaimState>;
    fn class(&self, name: &str) -> Option<&ClassRecord>;
    /// The class given to claims that name none.
    fn default_class(&self) -> Option<&str>;
    /// The node holding the volume or snapshot `origin` names, once its
    /// `LogicalVolume` is known.
    fn origin_node(&self, origin: &Origin) -> Option<&str>;
}

/// One pending lvmlocal claim of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNeed {
    pub key: ClaimKey,
    pub media: MediaClass,
    pub bytes: u64,
    /// From the StorageClass; `None` means the extender's default.
    pub placement: Option<Placement>,
    /// Set when kube-scheduler already picked the node for this claim (the
    /// pod is being scheduled again); the claim then only fits there.
    pub selected_node: Option<Box<str>>,
    /// The node of the volume or snapshot the claim copies: the only one it
    /// can be made on.
    pub origin_node: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NeedsError {
    #[error("claim {0} is not in the extender's cache yet")]
    ClaimNotCached(ClaimKey),
    #[error("claim {0} requests no storage size")]
    NoSize(ClaimKey),
    #[error(
        "claim {claim} copies {origin}, whose lvmlocal volume is not known (yet): it can only be \
         made on that volume's node"
    )]
    UnknownOrigin { claim: ClaimKey, origin: Origin },
    #[error("storage class {class} of claim {claim} is unusable: {reason}")]
    InvalidClass {
        claim: ClaimKey,
        class: String,
        reason: String,
    },
}

/// A pod's pending lvmlocal claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNeeds {
    pub claims: Vec<ClaimNeed>,
}

impl PodNeeds {
    /// Whether the pod has volumes that could be lvmlocal's at all; false lets
    /// a pod pass without looking at any cache.
    pub fn may_need_storage(pod: &Pod) -> bool {
        pod.spec
            .as_ref()
            .and_then(|spec| spec.volumes.as_ref())
            .is_some_and(|volumes| {
                volumes.iter().any(|volume| {
                    volume.persistent_volume_claim.is_some() || volume.ephemeral.is_some()
                })
            })
    }

    pub fn of(pod: &Pod, catalog: &impl Catalog) -> Result<PodNeeds, NeedsError> {
        let mut needs = PodNeeds::default();
        let Some(volumes) = pod.spec.as_ref().and_then(|spec| spec.volumes.as_ref()) else {
            return Ok(needs);
        };
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
        for volume in volumes {
            let (key, pending) = if let Some(source) = &volume.persistent_volume_claim {
                let key = ClaimKey::new(namespace, &source.claim_name);
                match catalog.claim(&key) {
                    None => return Err(NeedsError::ClaimNotCached(key)),
                    Some(ClaimState::Bound) => continue,
                    // A claim that names no class after admission has none.
                    Some(ClaimState::Pending(pending)) => (key, pending.clone()),
                }
            } else if let Some(ephemeral) = &volume.ephemeral {
                // The ephemeral volume controller names the claim
                // `<pod>-<volume>`; until it has created it, the template
                // says what it will be.
                let key = ClaimKey::new(namespace, &format!("{pod_name}-{}", volume.name));
                match catalog.claim(&key) {
                    Some(ClaimState::Bound) => continue,
                    Some(ClaimState::Pending(pending)) => (key, pending.clone()),
                    None => {
                        let Some(template) = &ephemeral.volume_claim_template else {
                            continue;
                        };
                        let storage_class = template
                            .spec
                            .storage_class_name
                            .as_deref()
                            .or_else(|| catalog.default_class())
                            .map(Box::from);
                        let pending = PendingClaim {
                            storage_class,
                            bytes: requested_bytes(&template.spec),
                            selected_node: None,
                            origin: origin(namespace, &template.spec),
                        };
                        (key, pending)
                    }
                }
            } else {
                continue;
            };

            // An unknown class is not lvmlocal's to judge: kube-scheduler's
            // own volume binding turns such a pod away.
            let Some(class_name) = pending.storage_class else {
                continue;
            };
            let Some(class) = catalog.class(&class_name) else {
                continue;
            };
            let (media, placement, thin) = match &class.kind {
                ClassKind::Foreign => continue,
                ClassKind::Invalid(reason) => {
                    return Err(NeedsError::InvalidClass {
                        claim: key,
                        class: class_name.into(),
                        reason: reason.clone(),
                    });
                }
                ClassKind::Lvmlocal {
                    media,
                    placement,
                    thin,
                } => (*media, *placement, *thin),
            };
            let bytes = pending
                .bytes
                .ok_or_else(|| NeedsError::NoSize(key.clone()))?;
            // What the volume will take from its group: a thin one its size
            // over the ratio, as the controller and the agent charge it.
            let bytes = thin.map_or(bytes, |ratio| ratio.charge(bytes));
            if needs.claims.iter().any(|claim| claim.key == key) {
                continue;
            }
            // A copy is a thin snapshot of its origin: only its node will do.
            let origin_node = match &pending.origin {
                None => None,
                Some(origin) => match catalog.origin_node(origin) {
                    Some(node) => Some(Box::from(node)),
                    None => {
                        return Err(NeedsError::UnknownOrigin {
                            claim: key,
                            origin: origin.clone(),
                        });
                    }
                },
            };
            needs.claims.push(ClaimNeed {
                key,
                media,
                bytes,
                placement,
                selected_node: pending.selected_node,
                origin_node,
            });
        }
        Ok(needs)
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use serde_json::json;

    const GI: u64 = 1 << 30;

    #[derive(Default)]
    struct Cached {
        claims: HashMap<ClaimKey, ClaimState>,
        classes: HashMap<String, ClassRecord>,
    }

    impl Catalog for Cached {
        fn claim(&self, key: &ClaimKey) -> Option<&ClaimState> {
            self.claims.get(key)
        }
        fn class(&self, name: &str) -> Option<&ClassRecord> {
            self.classes.get(name)
        }
        fn default_class(&self) -> Option<&str> {
            self.classes
                .iter()
                .find(|(_, class)| class.default)
                .map(|(name, _)| name.as_str())
        }
        fn origin_node(&self, origin: &Origin) -> Option<&str> {
            match origin {
                Origin::Snapshot(key) if key == &ClaimKey::new("db", "daily") => Some("node-b"),
                Origin::Claim(key) if key == &ClaimKey::new("db", "old") => Some("node-c"),
                _ => None,
            }
        }
    }

    fn class(json: serde_json::Value) -> StorageClass {
        serde_json::from_value(json).unwrap()
    }

    fn catalog() -> Cached {
        let mut cached = Cached::default();
        for sc in [
            class(json!({
                "metadata": {"name": "fast", "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
                "provisioner": "lvmlocal.io",
                "parameters": {"lvmlocal.io/media": "nvme"}
            })),
            class(json!({
                "metadata": {"name": "bulk"},
                "provisioner": "lvmlocal.io",
                "parameters": {"lvmlocal.io/media": "hdd", "lvmlocal.io/placement": "spread"}
            })),
            class(json!({"metadata": {"name": "ebs"}, "provisioner": "ebs.csi.aws.com"})),
            class(json!({
                "metadata": {"name": "thin"},
                "provisioner": "lvmlocal.io",
                "parameters": {"lvmlocal.io/media": "nvme", "lvmlocal.io/provisioning": "thin",
                               "lvmlocal.io/overprovision-ratio": "2.5"}
            })),
            class(json!({
                "metadata": {"name": "typo"},
                "provisioner": "lvmlocal.io",
                "parameters": {"lvmlocal.io/media": "NVMe"}
            })),
        ] {
            cached
                .classes
                .insert(sc.metadata.name.clone().unwrap(), ClassRecord::of(&sc));
        }
        for pvc in [
            json!({"metadata": {"name": "data", "namespace": "db"},
                   "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "100Gi"}}}}),
            json!({"metadata": {"name": "logs", "namespace": "db"},
                   "spec": {"storageClassName": "bulk", "resources": {"requests": {"storage": "1Ti"}}}}),
            json!({"metadata": {"name": "old", "namespace": "db"},
                   "spec": {"storageClassName": "fast", "volumeName": "pvc-1", "resources": {"requests": {"storage": "1Gi"}}},
                   "status": {"phase": "Bound"}}),
            json!({"metadata": {"name": "cloud", "namespace": "db"},
                   "spec": {"storageClassName": "ebs", "resources": {"requests": {"storage": "1Gi"}}}}),
            json!({"metadata": {"name": "bad", "namespace": "db"},
                   "spec": {"storageClassName": "typo", "resources": {"requests": {"storage": "1Gi"}}}}),
            json!({"metadata": {"name": "pinned", "namespace": "db",
                                "annotations": {SELECTED_NODE_ANNOTATION: "node-a"}},
                   "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "5Gi"}}}}),
            json!({"metadata": {"name": "web-0-scratch", "namespace": "db"},
                   "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "3Gi"}}}}),
            json!({"metadata": {"name": "sparse", "namespace": "db"},
                   "spec": {"storageClassName": "thin", "resources": {"requests": {"storage": "100Gi"}}}}),
            json!({"metadata": {"name": "restored", "namespace": "db"},
                   "spec": {"storageClassName": "thin", "resources": {"requests": {"storage": "100Gi"}},
                            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "daily"}}}),
            json!({"metadata": {"name": "cloned", "namespace": "db"},
                   "spec": {"storageClassName": "thin", "resources": {"requests": {"storage": "10Gi"}},
                            "dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "old"}}}),
            json!({"metadata": {"name": "orphan-copy", "namespace": "db"},
                   "spec": {"storageClassName": "thin", "resources": {"requests": {"storage": "10Gi"}},
                            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "gone"}}}),
            json!({"metadata": {"name": "sizeless", "namespace": "db"},
                   "spec": {"storageClassName": "fast"}}),
        ] {
            let pvc: PersistentVolumeClaim = serde_json::from_value(pvc).unwrap();
            cached
                .claims
                .insert(ClaimKey::of(&pvc), ClaimState::of(&pvc));
        }
        cached
    }

    fn pod(volumes: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "db", "uid": "u-1"},
            "spec": {"containers": [{"name": "c"}], "volumes": volumes}
        }))
        .unwrap()
    }

    fn claim_volume(name: &str) -> serde_json::Value {
        json!({"name": name, "persistentVolumeClaim": {"claimName": name}})
    }

    fn ephemeral(name: &str, class: Option<&str>, size: &str) -> serde_json::Value {
        let mut spec =
            json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}});
        if let Some(class) = class {
            spec["storageClassName"] = json!(class);
        }
        json!({"name": name, "ephemeral": {"volumeClaimTemplate": {"spec": spec}}})
    }

    fn need(name: &str, media: MediaClass, bytes: u64, placement: Option<Placement>) -> ClaimNeed {
        ClaimNeed {
            key: ClaimKey::new("db", name),
            media,
            bytes,
            placement,
            selected_node: None,
            origin_node: None,
        }
    }

    /// Name, the pod's volumes, what it needs.
    type Case = (
        &'static str,
        serde_json::Value,
        Result<Vec<ClaimNeed>, NeedsError>,
    );

    #[test]
    fn table() {
        use MediaClass::*;
        let catalog = catalog();
        let cases: Vec<Case> = vec![
            (
                "unbound lvmlocal claims, each with its class's media and placement",
                json!([claim_volume("data"), claim_volume("logs")]),
                Ok(vec![
                    need("data", Nvme, 100 * GI, None),
                    need("logs", Hdd, 1 << 40, Some(Placement::Spread)),
                ]),
            ),
            (
                "a thin claim needs its size over its class's ratio",
                json!([claim_volume("sparse")]),
                Ok(vec![need("sparse", Nvme, 40 * GI, None)]),
            ),
            (
                "a restore and a clone only fit their origin's node",
                json!([claim_volume("restored"), claim_volume("cloned")]),
                Ok(vec![
                    ClaimNeed {
                        origin_node: Some("node-b".into()),
                        ..need("restored", Nvme, 40 * GI, None)
                    },
                    ClaimNeed {
                        origin_node: Some("node-c".into()),
                        ..need("cloned", Nvme, 4 * GI, None)
                    },
                ]),
            ),
            (
                "a copy of an origin not known yet fits nowhere for now",
                json!([claim_volume("orphan-copy")]),
                Err(NeedsError::UnknownOrigin {
                    claim: ClaimKey::new("db", "orphan-copy"),
                    origin: Origin::Snapshot(ClaimKey::new("db", "gone")),
                }),
            ),
            (
                "bound and foreign claims need nothing",
                json!([claim_volume("old"), claim_volume("cloud"), {"name": "tmp", "emptyDir": {}}]),
                Ok(vec![]),
            ),
            (
                "a claim referenced twice counts once",
                json!([claim_volume("data"), {"name": "again", "persistentVolumeClaim": {"claimName": "data"}}]),
                Ok(vec![need("data", Nvme, 100 * GI, None)]),
            ),
            (
                "a selected node is carried along",
                json!([claim_volume("pinned")]),
                Ok(vec![ClaimNeed {
                    selected_node: Some("node-a".into()),
                    ..need("pinned", Nvme, 5 * GI, None)
                }]),
            ),
            (
                "an ephemeral volume whose claim exists uses the claim",
                json!([ephemeral("scratch", Some("bulk"), "1Gi")]),
                Ok(vec![need("web-0-scratch", Nvme, 3 * GI, None)]),
            ),
            (
                "an ephemeral volume without a claim yet uses its template",
                json!([ephemeral("cache", Some("bulk"), "20Gi")]),
                Ok(vec![need("web-0-cache", Hdd, 20 * GI, Some(Placement::Spread))]),
            ),
            (
                "a template without a class gets the default class",
                json!([ephemeral("cache", None, "2Gi")]),
                Ok(vec![need("web-0-cache", Nvme, 2 * GI, None)]),
            ),
            (
                "an ephemeral volume of another driver",
                json!([ephemeral("cache", Some("ebs"), "2Gi")]),
                Ok(vec![]),
            ),
            (
                "a class the cache does not know",
                json!([ephemeral("cache", Some("nowhere"), "2Gi")]),
                Ok(vec![]),
            ),
            (
                "a claim missing from the cache",
                json!([claim_volume("data"), claim_volume("nope")]),
                Err(NeedsError::ClaimNotCached(ClaimKey::new("db", "nope"))),
            ),
            (
                "a misconfigured lvmlocal class",
                json!([claim_volume("bad")]),
                Err(NeedsError::InvalidClass {
                    claim: ClaimKey::new("db", "bad"),
                    class: "typo".into(),
                    reason: "parameter lvmlocal.io/media: unknown media class \"NVMe\"; expected one of nvme, ssd, hdd".into(),
                }),
            ),
            (
                "a claim without a size",
                json!([claim_volume("sizeless")]),
                Err(NeedsError::NoSize(ClaimKey::new("db", "sizeless"))),
            ),
        ];
        for (name, volumes, expected) in cases {
            let got = PodNeeds::of(&pod(volumes), &catalog).map(|needs| needs.claims);
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn pods_without_claims_skip_the_catalog() {
        let none: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": []}}))
                .unwrap();
        assert!(!PodNeeds::may_need_storage(&none));
        assert!(!PodNeeds::may_need_storage(&pod(
            json!([{"name": "tmp", "emptyDir": {}}])
        )));
        assert!(PodNeeds::may_need_storage(&pod(json!([claim_volume("x")]))));
        assert!(PodNeeds::may_need_storage(&pod(json!([ephemeral(
            "e", None, "1Gi"
        )]))));
        assert_eq!(
            PodNeeds::of(&none, &Cached::default()),
            Ok(PodNeeds::default())
        );
    }

    #[test]
    fn class_records() {
        let missing = class(json!({"metadata": {"name": "x"}, "provisioner": "lvmlocal.io"}));
        assert_eq!(
            ClassRecord::of(&missing).kind,
            ClassKind::Invalid("parameter lvmlocal.io/media is required: nvme, ssd or hdd".into())
        );
        let unknown = class(json!({
            "metadata": {"name": "x"}, "provisioner": "lvmlocal.io",
            "parameters": {"lvmlocal.io/media": "ssd", "lvmlocal.io/medai": "nvme"}
        }));
        let ClassKind::Invalid(reason) = ClassRecord::of(&unknown).kind else {
            panic!("an unknown parameter is accepted");
        };
        assert!(
            reason.starts_with("unknown parameter \"lvmlocal.io/medai\""),
            "{reason}"
        );
        let bad_placement = class(json!({
            "metadata": {"name": "x"}, "provisioner": "lvmlocal.io",
            "parameters": {"lvmlocal.io/media": "ssd", "lvmlocal.io/placement": "pack"}
        }));
        assert_eq!(
            ClassRecord::of(&bad_placement).kind,
            ClassKind::Invalid(
                "parameter lvmlocal.io/placement must be binpack, spread or balanced, not \"pack\""
                    .into()
            )
        );
        let not_default = class(json!({
            "metadata": {"name": "x", "annotations": {DEFAULT_CLASS_ANNOTATION: "false"}},
            "provisioner": "other"
        }));
        assert_eq!(
            ClassRecord::of(&not_default),
            ClassRecord {
                kind: ClassKind::Foreign,
                default: false
            }
        );
    }

    #[test]
    fn claim_states() {
        let pending: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "n"},
            "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "bogus"}}},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        assert_eq!(
            ClaimState::of(&pending),
            ClaimState::Pending(PendingClaim {
                storage_class: Some("fast".into()),
                bytes: None,
                selected_node: None,
                origin: None,
            })
        );
        assert_eq!(ClaimKey::of(&pending).to_string(), "n/c");
        let bound_by_name: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "n"},
            "spec": {"volumeName": "pv-1"}
        }))
        .unwrap();
        assert_eq!(ClaimState::of(&bound_by_name), ClaimState::Bound);
    }
}
