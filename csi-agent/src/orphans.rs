//! The orphan audit: LVs that carry lvmlocal's tag but that no
//! `LogicalVolume` of this node names. They are counted and logged, never
//! removed: destroying data needs a recorded deletion intent.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use lvmlocal_proto::crd::LogicalVolume;

use crate::metrics::Metrics;
use crate::volumes::{LocalVolume, VolumeBackend};

/// How often the LVs are compared with the objects to find orphans.
const ORPHAN_CHECK: Duration = Duration::from_secs(60);

/// The LVs no object claims.
pub fn orphans<'a>(local: &'a [LocalVolume], objects: &HashSet<String>) -> Vec<&'a LocalVolume> {
    local
        .iter()
        .filter(|volume| !objects.contains(&volume.id))
        .collect()
}

/// Compares the LVs with the objects, so an LV no object claims is seen.
pub struct OrphanCheck<B> {
    volumes: Arc<B>,
    objects: Store<LogicalVolume>,
    metrics: Arc<Metrics>,
    /// Orphans already logged, so each is logged when it appears.
    reported: BTreeSet<String>,
}

impl<B: VolumeBackend> OrphanCheck<B> {
    pub fn new(volumes: Arc<B>, objects: Store<LogicalVolume>, metrics: Arc<Metrics>) -> Self {
        Self {
            volumes,
            objects,
            metrics,
            reported: BTreeSet::new(),
        }
    }

    pub async fn run(mut self) {
        // Before the first full listing every LV would look orphaned.
        if self.objects.wait_until_ready().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(ORPHAN_CHECK);
        loop {
            tick.tick().await;
            self.check().await;
        }
    }

    async fn check(&mut self) {
        // LVs first: an LV is made only once its object is in the cache, so
        // a volume being made now cannot pass for an orphan.
        let local = match self.volumes.list().await {
            Ok(local) => local,
            Err(err) => {
                tracing::warn!(error = %err, "cannot list LVs to look for orphans");
                return;
            }
        };
        let objects: HashSet<String> = self
            .objects
            .state()
            .iter()
            .map(|lv| lv.name_any())
            .collect();
        let found = orphans(&local, &objects);
        self.metrics.orphaned_volumes(found.len());
        for volume in &found {
            if !self.reported.contains(&volume.id) {
                tracing::warn!(
                    volume = %volume.id,
                    vg = %volume.vg,
                    bytes = volume.size_bytes,
                    pvc = volume.pvc.as_deref().unwrap_or("-"),
                    "orphaned LV: it carries lvmlocal's tag but no LogicalVolume names it; left in place"
                );
            }
        }
        self.reported = found.iter().map(|volume| volume.id.clone()).collect();
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};
    use lvmlocal_proto::MediaClass;
    use lvmlocal_proto::rpc::RpcMetrics;

    use super::*;
    use crate::fake_lvm::{FakeLvm, local, object};

    const GIB: u64 = 1 << 30;

    #[test]
    fn orphans_are_the_lvs_no_object_names() {
        let lvs = [
            local("pvc-a", MediaClass::Nvme, GIB),
            local("pvc-b", MediaClass::Hdd, GIB),
            local("pvc-c", MediaClass::Ssd, GIB),
        ];
        let names = |names: &[&str]| -> HashSet<String> {
            names.iter().map(|name| name.to_string()).collect()
        };
        let ids = |found: Vec<&LocalVolume>| -> Vec<String> {
            found.into_iter().map(|volume| volume.id.clone()).collect()
        };
        assert_eq!(
            ids(orphans(&lvs, &names(&["pvc-a", "pvc-c", "pvc-x"]))),
            ["pvc-b"]
        );
        assert_eq!(ids(orphans(&lvs, &names(&[]))), ["pvc-a", "pvc-b", "pvc-c"]);
        assert!(orphans(&lvs, &names(&["pvc-a", "pvc-b", "pvc-c"])).is_empty());
        assert!(orphans(&[], &names(&["pvc-a"])).is_empty());
    }

    #[tokio::test]
    async fn the_orphan_check_counts_lvs_without_objects() {
        let backend = Arc::new(
            FakeLvm::new(0)
                .with(local("pvc-1", MediaClass::Nvme, GIB))
                .with(local("pvc-gone", MediaClass::Hdd, GIB)),
        );
        let (objects, mut writer) = reflector::store::<LogicalVolume>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(object(GIB, 1)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let metrics = Arc::new(Metrics::new(&RpcMetrics::default()));
        let mut check = OrphanCheck::new(backend.clone(), objects, metrics.clone());
        check.check().await;
        assert!(
            metrics
                .encode()
                .contains("lvmlocal_agent_orphaned_volumes 1"),
            "{}",
            metrics.encode()
        );
        assert_eq!(check.reported, BTreeSet::from(["pvc-gone".to_owned()]));
        assert_eq!(
            backend.ids(),
            ["pvc-1", "pvc-gone"],
            "an orphan is never removed"
        );

        writer.apply_watcher_event(&watcher::Event::Apply({
            let mut claimed = object(GIB, 1);
            claimed.metadata.name = Some("pvc-gone".into());
            claimed
        }));
        check.check().await;
        assert!(
            metrics
                .encode()
                .contains("lvmlocal_agent_orphaned_volumes 0")
        );
        assert!(check.reported.is_empty());
    }
}
