//! The agent's disk loop: discover → plan → lvm → report, at start, every
//! rescan interval, and soon after a disk comes, goes or changes size. Each
//! pass also reads the volume index afresh from LVM, for what was changed
//! behind the agent's back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::claim::{self, Claiming, NodeLabels, NodeSource};
use crate::command::Runner;
use crate::config::DiscoveryConfig;
use crate::disk_load::{self, Members};
use crate::inventory::{self, Inventory, InventoryError, Sources};
use crate::lvm::{Lvm, LvmError};
use crate::metrics::Metrics;
use crate::node_storage::{self, Publisher};
use crate::volumes::Volumes;

/// Block devices show up in bursts (a disk, then its partitions): wait for
/// the burst to end before looking.
const SETTLE: Duration = Duration::from_secs(1);
/// Least time between the end of one pass and a pass a uevent asks for:
/// disks that keep coming and going cost one pass per gap, not one each.
const MIN_GAP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RescanError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("building volume groups: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Apply(Vec<LvmError>),
    #[error("writing NodeLocalStorage: {0}")]
    Publish(#[from] kube::Error),
}

pub struct Rescanner {
    pub config: DiscoveryConfig,
    pub sources: Sources,
    pub runner: Runner,
    pub lvm: Lvm,
    pub metrics: Arc<Metrics>,
    /// None in standalone mode: no Kubernetes API to report to.
    pub publisher: Option<Publisher>,
    /// The volume index to refresh when the groups change under it.
    pub volumes: Option<Arc<Volumes>>,
    /// Where the claim label is read, each pass; None in standalone mode.
    pub node: Option<NodeSource>,
    /// The last pass's decision, to log only when it changes.
    claiming: Option<Claiming>,
    /// The disks of each group, for the load sampler.
    members: watch::Sender<Members>,
}

impl Rescanner {
    /// A rescanner that reports to no cluster and refreshes no volume index.
    pub fn new(
        config: DiscoveryConfig,
        sources: Sources,
        runner: Runner,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            sources,
            lvm: Lvm::new(runner.clone()),
            runner,
            metrics,
            publisher: None,
            volumes: None,
            node: None,
            claiming: None,
            members: watch::Sender::new(Members::new()),
        }
    }

    /// The disks of each volume group as of the last pass.
    pub fn members(&self) -> watch::Receiver<Members> {
        self.members.subscribe()
    }

    /// One pass: takes the inventory, carries out the plan, and reports what
    /// the node looks like afterwards.
    pub async fn rescan(&mut self) -> Result<Inventory, RescanError> {
        let started = Instant::now();
        let mut inventory = self.take().await?;
        let mut failures = Vec::new();
        let built = !inventory.plan.actions.is_empty();
        if built {
            for action in &inventory.plan.actions {
                tracing::info!(?action, "building volume group");
                // One class failing must not keep the others from being built.
                if let Err(err) = self.lvm.apply(action).await {
                    tracing::error!(error = %err, ?action, "volume group action failed");
                    failures.push(err);
                }
            }
            inventory = self.take().await?;
        }
        if let Some(volumes) = &self.volumes {
            let refreshed = volumes.refresh().await.unwrap_or_else(|err| {
                tracing::warn!(error = %err, "volume index not refreshed");
                false
            });
            // Groups built or grown must not wait for the next pass: the
            // next call reads LVM itself.
            if !refreshed && built {
                volumes.invalidate();
            }
        }
        self.metrics.observe(&inventory, started.elapsed());
        self.members.send_if_modified(|members| {
            let now = disk_load::members(&inventory);
            let changed = *members != now;
            *members = now;
            changed
        });
        if let Some(publisher) = &mut self.publisher {
            let status = node_storage::status(&inventory);
            if publisher.publish(&status).await? {
                tracing::info!("NodeLocalStorage updated");
            }
        }
        if failures.is_empty() {
            Ok(inventory)
        } else {
            Err(RescanError::Apply(failures))
        }
    }

    async fn take(&mut self) -> Result<Inventory, InventoryError> {
        let labels = match &self.node {
            Some(node) => node.labels().await,
            None => NodeLabels::Standalone,
        };
        let claiming = claim::decide(&self.config, &labels);
        if self.claiming.as_ref() != Some(&claiming) {
            match &claiming {
                Claiming::Enabled => tracing::info!("claiming blank disks on this node"),
                Claiming::Disabled(why) => tracing::info!(%why, "claiming no disk"),
            }
            self.claiming = Some(claiming.clone());
        }
        inventory::take(
            &self.sources,
            &self.runner,
            &self.lvm,
            &self.config,
            &claiming,
        )
        .await
    }

    /// Rescans until the task is dropped: every interval, and soon after each
    /// message on `trigger`.
    pub async fn run(mut self, mut trigger: mpsc::Receiver<()>) {
        let mut interval = tokio::time::interval(self.config.rescan_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass = Instant::now();
        loop {
            let why = tokio::select! {
                _ = interval.tick() => "interval",
                Some(()) = trigger.recv() => {
                    let gap = MIN_GAP.saturating_sub(last_pass.elapsed());
                    tokio::time::sleep(SETTLE.max(gap)).await;
                    // Events that came meanwhile are covered by this pass.
                    while trigger.try_recv().is_ok() {}
                    interval.reset();
                    "disk uevent"
                }
            };
            let span = tracing::info_span!("rescan", why);
            if let Err(err) = self.rescan().instrument(span).await {
                self.metrics.rescan_failed();
                tracing::error!(error = %err, "rescan failed");
            }
            last_pass = Instant::now();
        }
    }
}
