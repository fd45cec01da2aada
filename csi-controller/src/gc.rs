//! Garbage collection of `LogicalVolume`s whose node is gone for good.
//!
//! Deleting a `LogicalVolume` waits for its node's agent to remove the LV and
//! the finalizer. When the Node object itself has been gone for longer than
//! a grace period, no agent will ever do that, so the controller drops the
//! finalizer of each of that node's volumes that is being deleted. It never
//! deletes a volume by itself: a volume whose PVC still exists stays. If the
//! node comes back with its disks, its agent finds the LV without an object
//! and reports it as orphaned; nothing removes data automatically.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use lvmlocal_proto::crd::{LV_FINALIZER, LogicalVolume};
use serde_json::json;
use tokio::time::Instant;

use crate::caches::Caches;
use crate::kube_store::FIELD_MANAGER;

/// Remembers since when each node has been missing.
#[derive(Debug)]
pub struct NodeGone {
    grace: Duration,
    missing_since: HashMap<String, Instant>,
}

impl NodeGone {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            missing_since: HashMap::new(),
        }
    }

    /// The volumes whose finalizer can go now: being deleted, holding our
    /// finalizer, on a node this process has seen missing for `grace`. The
    /// clock starts at this process's first look, so a restart only delays.
    pub fn sweep(
        &mut self,
        volumes: &[Arc<LogicalVolume>],
        nodes: &HashSet<String>,
        now: Instant,
    ) -> Vec<Arc<LogicalVolume>> {
        self.missing_since.retain(|node, _| !nodes.contains(node));
        let mut stuck = Vec::new();
        for lv in volumes {
            let node = &lv.spec.node_name;
            if nodes.contains(node) {
                continue;
            }
            let since = *self.missing_since.entry(node.clone()).or_insert(now);
            let deleting = lv.metadata.deletion_timestamp.is_some();
            if deleting
                && lv.finalizers().iter().any(|f| f == LV_FINALIZER)
                && now - since >= self.grace
            {
                stuck.push(lv.clone());
            }
        }
        stuck
    }
}

/// Sweeps every `every` until the process stops; run by the leader only.
pub async fn run(client: Client, caches: Caches, grace: Duration, every: Duration) {
    let api: Api<LogicalVolume> = Api::all(client);
    let mut gone = NodeGone::new(grace);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let stuck = gone.sweep(&caches.volumes(), &caches.node_names(), Instant::now());
        for lv in stuck {
            match release(&api, &lv).await {
                Ok(()) => tracing::warn!(
                    volume = %lv.name_any(),
                    node = %lv.spec.node_name,
                    "node is gone; removed the finalizer of its deleted volume"
                ),
                Err(err) => {
                    tracing::warn!(volume = %lv.name_any(), error = %err, "cannot remove finalizer")
                }
            }
        }
    }
}

/// Drops our finalizer, only if the object is still the one judged.
async fn release(api: &Api<LogicalVolume>, lv: &LogicalVolume) -> Result<(), kube::Error> {
    let finalizers: Vec<&String> = lv
        .finalizers()
        .iter()
        .filter(|f| *f != LV_FINALIZER)
        .collect();
    let patch = json!({
        "metadata": {
            "resourceVersion": lv.resource_version(),
            "finalizers": finalizers,
        }
    });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch(&lv.name_any(), &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use lvmlocal_proto::MediaClass;
    use lvmlocal_proto::crd::LogicalVolumeSpec;

    fn lv(name: &str, node: &str, deleting: bool, finalizer: bool) -> Arc<LogicalVolume> {
        let mut lv = LogicalVolume::new(
            name,
            LogicalVolumeSpec {
                node_name: node.into(),
                media: MediaClass::Ssd,
                size_bytes: 1,
                fs_type: None,
                pvc: None,
                io_limits: None,
                thin: None,
                snapshot: None,
                source: None,
            },
        );
        if deleting {
            lv.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        if finalizer {
            lv.metadata.finalizers = Some(vec![LV_FINALIZER.into()]);
        }
        Arc::new(lv)
    }

    fn names(volumes: &[Arc<LogicalVolume>]) -> Vec<String> {
        volumes.iter().map(|lv| lv.name_any()).collect()
    }

    #[test]
    fn only_deleted_volumes_of_long_gone_nodes_are_released() {
        let grace = Duration::from_secs(600);
        let mut gone = NodeGone::new(grace);
        let volumes = [
            lv("on-live-node", "live", true, true),
            lv("not-deleted", "dead", false, true),
            lv("no-finalizer", "dead", true, false),
            lv("stuck", "dead", true, true),
        ];
        let nodes: HashSet<String> = ["live".to_owned()].into();
        let t0 = Instant::now();
        assert!(
            gone.sweep(&volumes, &nodes, t0).is_empty(),
            "grace starts now"
        );
        assert!(gone.sweep(&volumes, &nodes, t0 + grace / 2).is_empty());
        assert_eq!(names(&gone.sweep(&volumes, &nodes, t0 + grace)), ["stuck"]);
    }

    #[test]
    fn a_node_that_comes_back_restarts_the_clock() {
        let grace = Duration::from_secs(600);
        let mut gone = NodeGone::new(grace);
        let volumes = [lv("stuck", "flaky", true, true)];
        let without: HashSet<String> = HashSet::new();
        let with: HashSet<String> = ["flaky".to_owned()].into();
        let t0 = Instant::now();
        gone.sweep(&volumes, &without, t0);
        gone.sweep(&volumes, &with, t0 + grace / 2);
        assert!(gone.sweep(&volumes, &without, t0 + grace).is_empty());
        assert_eq!(
            names(&gone.sweep(&volumes, &without, t0 + grace + grace)),
            ["stuck"]
        );
    }
}
