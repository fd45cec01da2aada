//! How busy the disks of each volume group are: `/proc/diskstats` sampled
//! every few seconds, averaged over the group's disks, smoothed over about
//! a minute, turned into a load by `lvmlocal_proto::load`, and published in
//! the node's `NodeLocalStorage` (for the extender's `balanced` placement)
//! and as a metric.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use lvmlocal_proto::MediaClass;
use lvmlocal_proto::crd::{NodeLoad, NodeLocalStorage};
use serde_json::json;
use tokio::sync::watch;

use crate::discovery::Verdict;
use crate::inventory::Inventory;
use crate::metrics::Metrics;

/// Field manager of the load, apart from the rest of the status, so each
/// writer owns only its own fields.
const LOAD_MANAGER: &str = "lvmlocal-agent-load";
/// Time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// Time constant of the smoothing: a step in load shows 63 % after it, so a
/// burst of a few seconds barely moves the figure and a sustained load shows
/// within a minute or two.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Least change of a class's load that is written to the API server: the
/// ranking does not need finer news, and every node writing each sample
/// would be a steady stream of writes in a large cluster.
const PUBLISH_STEP: u32 = 5;

/// The disks of each volume group, by kernel name.
pub type Members = Vec<(MediaClass, String)>;

/// The member disks of the groups the inventory found.
pub fn members(inventory: &Inventory) -> Members {
    inventory
        .disks
        .iter()
        .filter(|disk| matches!(disk.verdict, Verdict::Member { .. }))
        .filter_map(|disk| Some((disk.media?, disk.name.clone())))
        .collect()
}

/// The two cumulative counters of one disk the load is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Milliseconds during which the disk had an I/O in flight.
    busy_ms: u64,
    /// Milliseconds of I/O in flight, weighted by how many were.
    queue_ms: u64,
}

/// The counters of every device in a `/proc/diskstats` text; lines it
/// cannot read are left out.
pub fn parse(diskstats: &str) -> HashMap<String, Counters> {
    diskstats
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // major minor name, then the I/O statistics: io_ticks is the
            // 10th, time_in_queue the 11th.
            let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
            Some((
                (*fields.get(2)?).to_owned(),
                Counters {
                    busy_ms: number(12)?,
                    queue_ms: number(13)?,
                },
            ))
        })
        .collect()
}

/// The smoothed utilisation and queue depth of each class.
#[derive(Debug, Default)]
pub struct Smoother {
    last: Option<(Instant, HashMap<String, Counters>)>,
    /// (busy share, queue depth) per class, smoothed.
    smoothed: HashMap<MediaClass, (f64, f64)>,
}

impl Smoother {
    /// Takes the counters read at `at`; returns the load of every class
    /// with a member disk seen in two samples in a row.
    pub fn sample(
        &mut self,
        at: Instant,
        counters: HashMap<String, Counters>,
        members: &Members,
    ) -> NodeLoad {
        let previous = self.last.replace((at, counters));
        let (now, counters) = self.last.as_ref().expect("just set");
        let Some((then, before)) = previous else {
            return NodeLoad::default();
        };
        let elapsed_ms = now.saturating_duration_since(then).as_secs_f64() * 1000.0;
        if elapsed_ms <= 0.0 {
            return self.load();
        }
        let alpha = 1.0 - (-elapsed_ms / WINDOW.as_secs_f64() / 1000.0).exp();
        let mut seen = Vec::new();
        for media in MediaClass::ALL {
            let (mut busy, mut queue, mut disks) = (0.0, 0.0, 0u32);
            for (_, name) in members.iter().filter(|(m, _)| *m == media) {
                let (Some(a), Some(b)) = (before.get(name), counters.get(name)) else {
                    continue;
                };
                // A counter that went back is a disk that was replaced.
                busy += b.busy_ms.saturating_sub(a.busy_ms) as f64 / elapsed_ms;
                queue += b.queue_ms.saturating_sub(a.queue_ms) as f64 / elapsed_ms;
                disks += 1;
            }
            if disks == 0 {
                continue;
            }
            let (busy, queue) = (busy / f64::from(disks), queue / f64::from(disks));
            let smoothed = self.smoothed.entry(media).or_insert((busy, queue));
            smoothed.0 += alpha * (busy - smoothed.0);
            smoothed.1 += alpha * (queue - smoothed.1);
            seen.push(media);
        }
        self.smoothed.retain(|media, _| seen.contains(media));
        self.load()
    }

    fn load(&self) -> NodeLoad {
        let mut load = NodeLoad::default();
        for (media, (busy, queue)) in &self.smoothed {
            *load.get_mut(*media) = Some(lvmlocal_proto::load::measure(*media, *busy, *queue));
        }
        load
    }
}

/// Whether `now` differs enough from what was last written to write it.
pub fn worth_publishing(published: Option<&NodeLoad>, now: &NodeLoad) -> bool {
    let Some(published) = published else {
        return true;
    };
    MediaClass::ALL
        .into_iter()
        .any(|media| match (published.get(media), now.get(media)) {
            (Some(a), Some(b)) => a.load_percent.abs_diff(b.load_percent) >= PUBLISH_STEP,
            (None, None) => false,
            _ => true,
        })
}

/// Samples until the task is dropped; writes the load into the node's
/// `NodeLocalStorage` when `client` is given.
pub async fn run(
    diskstats: PathBuf,
    mut members: watch::Receiver<Members>,
    client: Option<Client>,
    node: String,
    metrics: Arc<Metrics>,
) {
    let api: Option<Api<NodeLocalStorage>> = client.map(Api::all);
    let mut smoother = Smoother::default();
    let mut published: Option<NodeLoad> = None;
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&diskstats).await {
            Ok(text) => text,
            Err(err) => {
                tracing::warn!(error = %err, path = %diskstats.display(), "cannot read disk statistics");
                continue;
            }
        };
        let current = members.borrow_and_update().clone();
        let load = smoother.sample(Instant::now(), parse(&text), &current);
        metrics.media_load(&load);
        let Some(api) = &api else { continue };
        if !worth_publishing(published.as_ref(), &load) {
            continue;
        }
        match publish(api, &node, &load).await {
            Ok(()) => {
                tracing::debug!(?load, "disk load published");
                published = Some(load);
            }
            Err(err) => tracing::warn!(error = %err, "cannot publish the disk load"),
        }
    }
}

async fn publish(api: &Api<NodeLocalStorage>, node: &str, load: &NodeLoad) -> kube::Result<()> {
    let patch = json!({
        "apiVersion": NodeLocalStorage::api_version(&()),
        "kind": NodeLocalStorage::kind(&()),
        "status": { "load": load },
    });
    api.patch_status(
        node,
        &PatchParams::apply(LOAD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use http::{Request, Response};
    use kube::client::Body;
    use lvmlocal_proto::crd::MediaLoad;

    use super::*;
    use crate::api_mock::{answer, assert_status_apply, body};

    const STATS: &str = "\
 259       0 nvme0n1 1000 0 8000 500 2000 0 16000 900 0 1200 1400 0 0 0 0 0 0
 259       1 nvme1n1 10 0 80 5 20 0 160 9 0 12 14 0 0 0 0 0 0
   8       0 sda 5 0 40 1 0 0 0 0 0 3 1
 253       0 dm-0 1 2 3
";

    fn stats(nvme0: (u64, u64), sda: (u64, u64)) -> HashMap<String, Counters> {
        HashMap::from([
            (
                "nvme0n1".to_owned(),
                Counters {
                    busy_ms: nvme0.0,
                    queue_ms: nvme0.1,
                },
            ),
            (
                "sda".to_owned(),
                Counters {
                    busy_ms: sda.0,
                    queue_ms: sda.1,
                },
            ),
        ])
    }

    #[test]
    fn diskstats_give_busy_and_queue_time_of_every_disk() {
        let parsed = parse(STATS);
        assert_eq!(
            parsed["nvme0n1"],
            Counters {
                busy_ms: 1200,
                queue_ms: 1400
            }
        );
        // The short format of old kernels has the same first eleven fields.
        assert_eq!(
            parsed["sda"],
            Counters {
                busy_ms: 3,
                queue_ms: 1
            }
        );
        assert!(!parsed.contains_key("dm-0"), "too short to read");
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn load_is_averaged_over_a_group_and_smoothed() {
        let members: Members = vec![
            (MediaClass::Nvme, "nvme0n1".into()),
            (MediaClass::Nvme, "nvme1n1".into()),
            (MediaClass::Hdd, "sda".into()),
        ];
        let start = Instant::now();
        let mut smoother = Smoother::default();
        // The first sample only sets the baseline.
        assert_eq!(
            smoother.sample(start, stats((0, 0), (0, 0)), &members),
            NodeLoad::default()
        );
        // 10 s: nvme0n1 busy all of it with 4 in flight; nvme1n1 gone from
        // the statistics, so the group is nvme0n1 alone; sda idle.
        let at = start + SAMPLE_INTERVAL;
        let load = smoother.sample(at, stats((10_000, 40_000), (0, 0)), &members);
        assert_eq!(
            load.nvme,
            Some(MediaLoad {
                load_percent: 56, // (1 + 4/32) / 2
                busy_percent: 100,
                queue_depth_milli: 4000
            })
        );
        assert_eq!(load.hdd.map(|l| l.load_percent), Some(0));
        assert_eq!(load.ssd, None, "no member disk");
        // The load stops: the figure decays by e^(−10/60) a sample.
        let mut last = 56;
        for i in 2..8 {
            let at = start + SAMPLE_INTERVAL * i;
            let load = smoother.sample(at, stats((10_000, 40_000), (0, 0)), &members);
            let now = load.nvme.unwrap().load_percent;
            assert!(now < last, "{now} after {last}");
            last = now;
        }
        // 60 s after it stopped: about e^-1 of where it was.
        assert!((18..=23).contains(&last), "{last}");
        // A member that leaves the group takes its class with it.
        let load = smoother.sample(
            start + SAMPLE_INTERVAL * 9,
            stats((10_000, 40_000), (0, 0)),
            &vec![(MediaClass::Hdd, "sda".into())],
        );
        assert_eq!(load.nvme, None);
        assert!(load.hdd.is_some());
    }

    #[test]
    fn members_are_the_disks_of_the_groups() {
        use crate::discovery::Disk;
        let disk = |name: &str, media, verdict| Disk {
            name: name.into(),
            slot: None,
            media: Some(media),
            size_bytes: 1 << 30,
            serial: None,
            model: None,
            verdict,
        };
        let inventory = Inventory {
            disks: vec![
                disk(
                    "nvme0n1",
                    MediaClass::Nvme,
                    Verdict::Member {
                        vg: "lvmlocal-nvme".into(),
                    },
                ),
                disk("sdb", MediaClass::Hdd, Verdict::Usable),
            ],
            lvm: crate::plan::LvmState::default(),
            plan: crate::plan::Plan {
                groups: Vec::new(),
                actions: Vec::new(),
            },
        };
        assert_eq!(
            members(&inventory),
            vec![(MediaClass::Nvme, "nvme0n1".to_owned())]
        );
    }

    #[test]
    fn the_metric_follows_the_classes_that_have_disks() {
        let metrics = Metrics::new(&lvmlocal_proto::rpc::RpcMetrics::default());
        let mut load = NodeLoad {
            nvme: Some(lvmlocal_proto::load::measure(MediaClass::Nvme, 1.0, 4.0)),
            hdd: Some(MediaLoad::default()),
            ssd: None,
        };
        metrics.media_load(&load);
        let text = metrics.encode();
        assert!(
            text.contains("lvmlocal_agent_media_load_percent{media=\"nvme\"} 56"),
            "{text}"
        );
        assert!(text.contains("lvmlocal_agent_media_load_percent{media=\"hdd\"} 0"));
        assert!(!text.contains("media_load_percent{media=\"ssd\"}"));
        load.nvme = None;
        metrics.media_load(&load);
        assert!(
            !metrics
                .encode()
                .contains("media_load_percent{media=\"nvme\"}")
        );
    }

    #[test]
    fn only_a_change_of_a_step_is_published() {
        let load = |nvme: Option<u32>, hdd: Option<u32>| NodeLoad {
            nvme: nvme.map(|p| MediaLoad {
                load_percent: p,
                ..MediaLoad::default()
            }),
            ssd: None,
            hdd: hdd.map(|p| MediaLoad {
                load_percent: p,
                ..MediaLoad::default()
            }),
        };
        let published = load(Some(20), Some(0));
        assert!(worth_publishing(None, &load(None, None)));
        assert!(!worth_publishing(
            Some(&published),
            &load(Some(24), Some(4))
        ));
        assert!(worth_publishing(Some(&published), &load(Some(25), Some(0))));
        assert!(worth_publishing(Some(&published), &load(Some(15), Some(0))));
        assert!(worth_publishing(Some(&published), &load(Some(20), None)));
    }

    #[tokio::test]
    async fn the_load_is_applied_to_the_status_under_its_own_manager() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<NodeLocalStorage> = Api::all(Client::new(service, "default"));
        let load = NodeLoad {
            nvme: Some(MediaLoad {
                load_percent: 56,
                busy_percent: 100,
                queue_depth_milli: 4000,
            }),
            ..NodeLoad::default()
        };
        let api_server = tokio::spawn(async move {
            let mut handle = pin!(handle);
            let (request, send) = handle.next_request().await.expect("status applied");
            assert_status_apply(&request, "node-a", "lvmlocal-agent-load");
            assert_eq!(
                body(request).await,
                json!({
                    "apiVersion": "lvmlocal.io/v1alpha1",
                    "kind": "NodeLocalStorage",
                    "status": {"load": {"nvme": {"loadPercent": 56, "busyPercent": 100, "queueDepthMilli": 4000}}},
                })
            );
            answer(
                send,
                &json!({"apiVersion": "lvmlocal.io/v1alpha1", "kind": "NodeLocalStorage",
                "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}}),
            );
        });
        publish(&api, "node-a", &load).await.unwrap();
        api_server.await.unwrap();
    }
}
