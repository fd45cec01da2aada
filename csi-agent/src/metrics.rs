//! The agent's Prometheus metrics and its `/healthz` and `/metrics` endpoints.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{NodeLoad, ThinPools};
use lvmlocal_proto::rpc::RpcMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::command::CommandMetrics;
use crate::discovery::Verdict;
use crate::inventory::Inventory;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MediaLabel {
    pub media: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    pub media: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error: String,
}

pub struct Metrics {
    registry: Registry,
    vg_size: Family<MediaLabel, Gauge>,
    vg_free: Family<MediaLabel, Gauge>,
    vg_allocated: Family<MediaLabel, Gauge>,
    vg_degraded: Family<MediaLabel, Gauge>,
    disks: Family<VerdictLabel, Gauge>,
    rescan_seconds: Histogram,
    rescan_failures: Counter,
    reconciles: Counter,
    reconcile_seconds: Histogram,
    reconcile_failures: Family<ErrorLabel, Counter>,
    orphaned_volumes: Gauge,
    abnormal_volumes: Family<ConditionLabel, Gauge>,
    volume_used: Family<VolumeLabel, Gauge>,
    volume_capacity: Family<VolumeLabel, Gauge>,
    media_load: Family<MediaLabel, Gauge>,
    kubelet_registered: Gauge,
    io_limited_pods: Gauge,
    io_limit_failures: Counter,
    thin_pool_data: Family<MediaLabel, Gauge>,
    thin_pool_metadata: Family<MediaLabel, Gauge>,
    thin_pool_size: Family<MediaLabel, Gauge>,
    /// Every external command the agent runs.
    pub commands: CommandMetrics,
    /// Unix time of the last rescan that completed, for `/healthz`.
    last_rescan: AtomicU64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabel {
    pub volume: String,
}

impl Metrics {
    /// The agent's metrics, with the CSI call metrics `rpc` beside them.
    pub fn new(rpc: &RpcMetrics) -> Self {
        let mut registry = Registry::with_prefix("lvmlocal_agent");
        rpc.register(&mut registry);
        let vg_size = Family::default();
        let vg_free = Family::default();
        let vg_allocated = Family::default();
        let vg_degraded = Family::default();
        let disks = Family::default();
        let rescan_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let rescan_failures = Counter::default();
        let reconciles = Counter::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let reconcile_failures = Family::default();
        let orphaned_volumes = Gauge::default();
        let abnormal_volumes = Family::default();
        let volume_used = Family::default();
        let volume_capacity = Family::default();
        let media_load = Family::default();
        let kubelet_registered = Gauge::default();
        let io_limited_pods = Gauge::default();
        let io_limit_failures = Counter::default();
        let thin_pool_data = Family::default();
        let thin_pool_metadata = Family::default();
        let thin_pool_size = Family::default();
        registry.register(
            "thin_pool_data_percent",
            "How full the data of a media class's thin pool is, 0 to 100",
            thin_pool_data.clone(),
        );
        registry.register(
            "thin_pool_metadata_percent",
            "How full the metadata of a media class's thin pool is, 0 to 100",
            thin_pool_metadata.clone(),
        );
        registry.register(
            "thin_pool_size_bytes",
            "Size of the data of a media class's thin pool",
            thin_pool_size.clone(),
        );
        registry.register(
            "io_limited_pods",
            "Pods held to a volume's IO limits, one per volume and pod, as of the last check",
            io_limited_pods.clone(),
        );
        registry.register(
            "io_limit_failures",
            "Attempts to write a volume's IO limits into a pod's cgroup that failed",
            io_limit_failures.clone(),
        );
        let commands = CommandMetrics::default();
        commands.register(&mut registry);
        registry.register(
            "volume_used_bytes",
            "Bytes used in a volume's filesystem, as last asked by kubelet",
            volume_used.clone(),
        );
        registry.register(
            "volume_capacity_bytes",
            "Size of a volume's filesystem, or of its LV for raw block",
            volume_capacity.clone(),
        );
        registry.register(
            "vg_size_bytes",
            "Size of the volume group of a media class",
            vg_size.clone(),
        );
        registry.register(
            "vg_free_bytes",
            "Free space in the volume group of a media class",
            vg_free.clone(),
        );
        registry.register(
            "vg_allocated_bytes",
            "Space taken by logical volumes in the volume group of a media class",
            vg_allocated.clone(),
        );
        registry.register(
            "vg_degraded",
            "1 when a physical volume of the group is missing",
            vg_degraded.clone(),
        );
        registry.register("disks", "Whole disks of the node by verdict", disks.clone());
        registry.register(
            "rescan_duration_seconds",
            "Time one rescan of the node takes",
            rescan_seconds.clone(),
        );
        registry.register(
            "rescan_failures",
            "Rescans that ended in an error",
            rescan_failures.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles of the node's LogicalVolumes",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile of a LogicalVolume takes",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that ended in a failure, by its reason",
            reconcile_failures.clone(),
        );
        registry.register(
            "orphaned_volumes",
            "lvmlocal LVs on this node without a LogicalVolume object",
            orphaned_volumes.clone(),
        );
        registry.register(
            "abnormal_volumes",
            "Volumes of this node whose condition is abnormal, by media class and reason",
            abnormal_volumes.clone(),
        );
        registry.register(
            "media_load_percent",
            "How busy the disks of a media class's volume group are, 0 to 100, smoothed",
            media_load.clone(),
        );
        registry.register(
            "kubelet_registered",
            "1 once kubelet has accepted the driver's registration, 0 if it refused it",
            kubelet_registered.clone(),
        );
        Self {
            registry,
            vg_size,
            vg_free,
            vg_allocated,
            vg_degraded,
            disks,
            rescan_seconds,
            rescan_failures,
            reconciles,
            reconcile_seconds,
            reconcile_failures,
            orphaned_volumes,
            abnormal_volumes,
            volume_used,
            volume_capacity,
            media_load,
            kubelet_registered,
            io_limited_pods,
            io_limit_failures,
            thin_pool_data,
            thin_pool_metadata,
            thin_pool_size,
            commands,
            last_rescan: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, inventory: &Inventory, took: Duration) {
        self.rescan_seconds.observe(took.as_secs_f64());
        self.last_rescan.store(now_secs(), Ordering::Relaxed);
        for group in &inventory.plan.groups {
            let label = MediaLabel {
                media: group.media.to_string(),
            };
            let (size, free) = inventory
                .lvm
                .vg(&group.vg)
                .map_or((0, 0), |vg| (vg.size_bytes, vg.free_bytes));
            self.vg_size.get_or_create(&label).set(gauge(size));
            self.vg_free.get_or_create(&label).set(gauge(free));
            self.vg_allocated
                .get_or_create(&label)
                .set(gauge(size - free));
            self.vg_degraded
                .get_or_create(&label)
                .set(i64::from(group.degraded()));
        }
        self.disks.clear();
        for disk in &inventory.disks {
            if disk.verdict != Verdict::NotADisk {
                let label = VerdictLabel {
                    verdict: disk.verdict.name().to_owned(),
                };
                self.disks.get_or_create(&label).inc();
            }
        }
    }

    pub fn volume_usage(&self, volume: &str, used: i64, capacity: i64) {
        let label = VolumeLabel {
            volume: volume.to_owned(),
        };
        self.volume_used.get_or_create(&label).set(used);
        self.volume_capacity.get_or_create(&label).set(capacity);
    }

    /// Drops a volume's gauges once it is no longer staged on this node.
    pub fn forget_volume(&self, volume: &str) {
        let label = VolumeLabel {
            volume: volume.to_owned(),
        };
        self.volume_used.remove(&label);
        self.volume_capacity.remove(&label);
    }

    pub fn rescan_failed(&self) {
        self.rescan_failures.inc();
    }

    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self, reason: &str) {
        self.reconcile_failures
            .get_or_create(&ErrorLabel {
                error: reason.to_owned(),
            })
            .inc();
    }

    /// Sets the figures of each thin pool; a class without one has none.
    pub fn thin_pools(&self, pools: &ThinPools) {
        for media in MediaClass::ALL {
            let label = MediaLabel {
                media: media.to_string(),
            };
            match pools.get(media) {
                Some(pool) => {
                    self.thin_pool_data
                        .get_or_create(&label)
                        .set(i64::from(pool.data_percent));
                    self.thin_pool_metadata
                        .get_or_create(&label)
                        .set(i64::from(pool.metadata_percent));
                    self.thin_pool_size
                        .get_or_create(&label)
                        .set(gauge(pool.data_bytes));
                }
                None => {
                    self.thin_pool_data.remove(&label);
                    self.thin_pool_metadata.remove(&label);
                    self.thin_pool_size.remove(&label);
                }
            }
        }
    }

    pub fn orphaned_volumes(&self, count: usize) {
        self.orphaned_volumes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the abnormal volumes to these counts; a pair not given is 0.
    pub fn abnormal_volumes(&self, counts: &HashMap<(MediaClass, String), usize>) {
        self.abnormal_volumes.clear();
        for ((media, reason), count) in counts {
            self.abnormal_volumes
                .get_or_create(&ConditionLabel {
                    media: media.to_string(),
                    reason: reason.clone(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Sets the load of each class that has disks; drops the others.
    pub fn media_load(&self, load: &NodeLoad) {
        for media in MediaClass::ALL {
            let label = MediaLabel {
                media: media.to_string(),
            };
            match load.get(media) {
                Some(load) => {
                    self.media_load
                        .get_or_create(&label)
                        .set(i64::from(load.load_percent));
                }
                None => {
                    self.media_load.remove(&label);
                }
            }
        }
    }

    /// What kubelet answered to the driver's registration.
    /// How many pods, counted once per volume, the last check held to IO
    /// limits.
    pub fn io_limited_pods(&self, pods: usize) {
        self.io_limited_pods
            .set(i64::try_from(pods).unwrap_or(i64::MAX));
    }

    pub fn io_limit_failed(&self) {
        self.io_limit_failures.inc();
    }

    pub fn kubelet_registered(&self, registered: bool) {
        self.kubelet_registered.set(i64::from(registered));
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Healthy while rescans keep completing: within `max_age` of the last.
    pub fn healthy(&self, max_age: Duration) -> bool {
        let last = self.last_rescan.load(Ordering::Relaxed);
        last > 0 && now_secs().saturating_sub(last) <= max_age.as_secs()
    }
}

fn gauge(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

struct Endpoint {
    metrics: Arc<Metrics>,
    max_age: Duration,
}

/// Serves `/healthz` and `/metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    max_age: Duration,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(scrape))
        .with_state(Arc::new(Endpoint { metrics, max_age }));
    axum::serve(listener, app).await
}

async fn healthz(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    if endpoint.metrics.healthy(endpoint.max_age) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no recent rescan\n")
    }
}

async fn scrape(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        endpoint.metrics.encode(),
    )
}
