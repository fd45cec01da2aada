//! The agent under a node's load, in the VM: 200 published volumes whose
//! stats are polled the way kubelet does (each every 10 s), while 50
//! CreateVolume and 50 DeleteVolume run at once. Reports LVM commands and
//! rescans per minute, the p50/p99 of CreateVolume against 50 concurrent
//! bare `lvcreate`s in the same VM (LVM's own floor: one VG lock), and the
//! p50/p99 of NodeGetVolumeStats.
//!
//!     scripts/bench-load.sh [--agent PATH]   (PATH: another csi-agent build)

use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lvmlocal_proto::csi::v1::{
    DeleteVolumeRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeUnpublishVolumeRequest,
};
use lvmlocal_tests::csi::{Agent, Csi, KUBELET_DIR, capability, create_request};
use lvmlocal_tests::guest::{self, http_get, workspace_binary};
use lvmlocal_tests::{GIB, MIB, Vm};

const VOLUMES: usize = 200;
const CHURN: usize = 50;
const VOLUME_BYTES: u64 = 256 * MIB;
const STATS_PERIOD: Duration = Duration::from_secs(10);
/// The load runs at least this long, so per-minute figures span a rescan.
const LOAD_AT_LEAST: Duration = Duration::from_secs(90);
const VG: &str = "lvmlocal-nvme";
/// Volumes made at once while setting up the node.
const SETUP_BATCH: usize = 4;

fn main() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args().skip(1);
    let agent = match (args.next().as_deref(), args.next()) {
        (Some("--agent"), Some(path)) => {
            std::fs::canonicalize(&path).with_context(|| format!("--agent {path}"))?
        }
        (None, _) => workspace_binary("csi-agent"),
        _ => anyhow::bail!("usage: load-bench [--agent PATH]"),
    };
    if guest::inside() {
        tokio::runtime::Runtime::new()?.block_on(guest_side(&agent))?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()?;
    let output = Vm::new()
        .nvme("load-a", 5, 160 * GIB)
        .memory_mib(3072)
        .timeout(Duration::from_secs(2400))
        .stream(true)
        .run(&[
            exe.to_str().context("exe path")?,
            "--agent",
            agent.to_str().context("agent path")?,
        ])?;
    Ok(ExitCode::from(u8::try_from(output.status).unwrap_or(1)))
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

fn bare_lvcreate(name: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let size = format!("{VOLUME_BYTES}b");
    let out = Command::new("lvcreate")
        .args(["--name", name, "--size", &size, "--wipesignatures", "y"])
        .args(["--zero", "y", "--yes", "--addtag", "lvmlocal.io/volume", VG])
        .output()?;
    ensure!(
        out.status.success(),
        "lvcreate {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(started.elapsed())
}

/// Counters of the agent's metrics: LVM commands run, rescans done.
fn counters() -> (u64, u64) {
    let metrics = http_get("127.0.0.1:9808", "/metrics");
    let value = |line: &str| -> u64 {
        line.rsplit(' ')
            .next()
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    };
    let lvm = metrics
        .lines()
        .filter(|line| line.starts_with("lvmlocal_agent_command_duration_seconds_count{"))
        .filter(|line| {
            ["\"lv", "\"vg", "\"pv"]
                .iter()
                .any(|prefix| line.contains(&format!("program={prefix}")))
        })
        .map(value)
        .sum();
    let rescans = metrics
        .lines()
        .find(|line| line.starts_with("lvmlocal_agent_rescan_duration_seconds_count "))
        .map_or(0, value);
    (lvm, rescans)
}

fn target(id: &str) -> String {
    format!("{KUBELET_DIR}/pods/bench/volumes/kubernetes.io~csi/{id}/dev")
}

async fn create(csi: &Csi, id: String) -> anyhow::Result<Duration> {
    let started = Instant::now();
    csi.controller
        .clone()
        .create_volume(create_request(&id, "nvme", None, VOLUME_BYTES))
        .await
        .with_context(|| format!("CreateVolume {id}"))?;
    Ok(started.elapsed())
}

async fn delete(csi: &Csi, id: String) -> anyhow::Result<Duration> {
    let started = Instant::now();
    csi.controller
        .clone()
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..DeleteVolumeRequest::default()
        })
        .await
        .with_context(|| format!("DeleteVolume {id}"))?;
    Ok(started.elapsed())
}

async fn publish(csi: &Csi, id: &str) -> anyhow::Result<()> {
    csi.node
        .clone()
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: target(id),
            volume_capability: Some(capability(None)),
            ..NodePublishVolumeRequest::default()
        })
        .await
        .with_context(|| format!("NodePublishVolume {id}"))?;
    Ok(())
}

async fn unpublish(csi: &Csi, id: &str) -> anyhow::Result<()> {
    csi.node
        .clone()
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: target(id),
        })
        .await
        .with_context(|| format!("NodeUnpublishVolume {id}"))?;
    Ok(())
}

/// Polls the stats of `ids` as kubelet does, each once per period, spread
/// over it, until `stop`; the latency of every call.
async fn poll_stats(csi: Csi, ids: Vec<String>, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut tick = tokio::time::interval(STATS_PERIOD / ids.len() as u32);
    let mut calls = Vec::new();
    for id in ids.iter().cycle() {
        tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut node = csi.node.clone();
        let request = NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target(id),
            ..NodeGetVolumeStatsRequest::default()
        };
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            node.node_get_volume_stats(request)
                .await
                .map(|_| started.elapsed())
        }));
    }
    let mut took = Vec::new();
    for call in calls {
        if let Ok(Ok(latency)) = call.await {
            took.push(latency);
        }
    }
    took
}

fn line(what: &str, samples: &mut [Duration]) -> (Duration, Duration) {
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    println!(
        "{what:<44} p50 {p50:>9.1?}  p99 {p99:>9.1?}  ({} calls)",
        samples.len()
    );
    (p50, p99)
}

async fn guest_side(agent: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all("/run/lvmlocal")?;
    let (_agent, csi) = Agent::start(agent, Path::new("/run/lvmlocal/csi.sock"), "nvme").await?;
    println!("agent: {}", agent.display());

    // LVM's floor: 50 bare lvcreates at once, nothing else running.
    let bare: Vec<_> = (0..CHURN)
        .map(|i| tokio::task::spawn_blocking(move || bare_lvcreate(&format!("bare-{i}"))))
        .collect();
    let mut floor = Vec::new();
    for call in bare {
        floor.push(call.await??);
    }
    let out = Command::new("lvremove")
        .args(["--yes", "--select", "lv_name=~^bare-"])
        .output()?;
    ensure!(out.status.success(), "lvremove bare-*");

    let started = Instant::now();
    let ids: Vec<String> = (0..VOLUMES).map(|i| format!("load-{i:03}")).collect();
    for batch in ids.chunks(SETUP_BATCH) {
        let calls: Vec<_> = batch
            .iter()
            .map(|id| {
                let (csi, id) = (csi.clone(), id.clone());
                tokio::spawn(async move {
                    create(&csi, id.clone()).await?;
                    publish(&csi, &id).await
                })
            })
            .collect();
        for call in calls {
            call.await??;
        }
    }
    println!(
        "{VOLUMES} volumes created and published in {:.1?}",
        started.elapsed()
    );
    let (leaving, staying) = ids.split_at(CHURN);
    for id in leaving {
        unpublish(&csi, id).await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_stats(csi.clone(), staying.to_vec(), stop.clone()));
    let (lvm_before, rescans_before) = counters();
    let load_started = Instant::now();
    let creates: Vec<_> = (0..CHURN)
        .map(|i| {
            let csi = csi.clone();
            tokio::spawn(async move { create(&csi, format!("new-{i:02}")).await })
        })
        .collect();
    let deletes: Vec<_> = leaving
        .iter()
        .map(|id| {
            let (csi, id) = (csi.clone(), id.clone());
            tokio::spawn(async move { delete(&csi, id).await })
        })
        .collect();
    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    for call in creates {
        created.push(call.await??);
    }
    for call in deletes {
        deleted.push(call.await??);
    }
    let churn = load_started.elapsed();
    if churn < LOAD_AT_LEAST {
        tokio::time::sleep(LOAD_AT_LEAST - churn).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (lvm_after, rescans_after) = counters();
    let window = load_started.elapsed();
    let mut stats = poller.await?;
    let minutes = window.as_secs_f64() / 60.0;

    println!("load: {CHURN} creates + {CHURN} deletes done in {churn:.1?}; window {window:.1?}");
    let (floor_p50, floor_p99) = line(&format!("{CHURN} concurrent bare lvcreate"), &mut floor);
    let (p50, p99) = line(
        &format!("{CHURN} concurrent CreateVolume under load"),
        &mut created,
    );
    println!(
        "{:<44} p50 {:>8.2}x  p99 {:>8.2}x",
        "CreateVolume / bare lvcreate",
        p50.as_secs_f64() / floor_p50.as_secs_f64(),
        p99.as_secs_f64() / floor_p99.as_secs_f64()
    );
    line(
        &format!("{CHURN} concurrent DeleteVolume (zeroing)"),
        &mut deleted,
    );
    line("NodeGetVolumeStats under load", &mut stats);
    println!(
        "LVM commands per minute: {:.1}   rescans per minute: {:.2}",
        (lvm_after - lvm_before) as f64 / minutes,
        (rescans_after - rescans_before) as f64 / minutes
    );
    Ok(())
}
