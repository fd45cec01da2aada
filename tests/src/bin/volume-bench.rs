//! The agent's volume figures, measured in the VM against the floor of
//! bare LVM commands in the same run:
//! - CreateVolume (to Ready) of 1 GiB against a bare `lvcreate` of the same size;
//! - 50 concurrent CreateVolume against the serial sum of 50 bare `lvcreate`s;
//! - NodeStageVolume (mkfs.ext4 + mount) of a 1 TiB volume against a 10 GiB one.
//!
//!     scripts/bench-volumes.sh

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lvmlocal_proto::csi::v1::{
    DeleteVolumeRequest, NodeStageVolumeRequest, NodeUnstageVolumeRequest,
};
use lvmlocal_tests::csi::{Agent, Csi, KUBELET_DIR, capability, create_request};
use lvmlocal_tests::guest::{self, workspace_binary};
use lvmlocal_tests::{GIB, Vm};

const ROUNDS: usize = 10;
const CONCURRENT: usize = 50;
const STAGE_ROUNDS: usize = 5;
const VG: &str = "lvmlocal-nvme";

fn main() -> anyhow::Result<ExitCode> {
    if guest::inside() {
        tokio::runtime::Runtime::new()?.block_on(guest_side())?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()?;
    let output = Vm::new()
        .nvme("bench-a", 5, 96 * GIB)
        .nvme("bench-b", 6, 5200 * GIB)
        .memory_mib(2048)
        .stream(true)
        .run(&[exe.to_str().context("exe path")?])?;
    Ok(ExitCode::from(u8::try_from(output.status).unwrap_or(1)))
}

fn lvm(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A bare `lvcreate` doing what the agent's does: same size, same wiping,
/// and tags of the same number and length (a volume's identity in LVM).
fn bare_lvcreate(name: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    lvm(&[
        "lvcreate",
        "--name",
        name,
        "--size",
        "1073741824b",
        "--wipesignatures",
        "y",
        "--zero",
        "y",
        "--yes",
        "--addtag",
        "lvmlocal.io/volume",
        "--addtag",
        "lvmlocal.io/requested=1073741824",
        "--addtag",
        "lvmlocal.io/access=ext4",
        VG,
    ])?;
    Ok(started.elapsed())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn create(csi: &Csi, name: &str, bytes: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    csi.controller
        .clone()
        .create_volume(create_request(name, "nvme", Some("ext4"), bytes))
        .await
        .with_context(|| format!("CreateVolume {name}"))?;
    Ok(started.elapsed())
}

async fn delete(csi: &Csi, name: &str) -> anyhow::Result<()> {
    csi.controller
        .clone()
        .delete_volume(DeleteVolumeRequest {
            volume_id: name.to_owned(),
            ..DeleteVolumeRequest::default()
        })
        .await?;
    Ok(())
}

async fn stage(csi: &Csi, name: &str) -> anyhow::Result<Duration> {
    let staging = format!("{KUBELET_DIR}/plugins/kubernetes.io/csi/lvmlocal.io/{name}/globalmount");
    let started = Instant::now();
    csi.node
        .clone()
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: name.to_owned(),
            staging_target_path: staging.clone(),
            volume_capability: Some(capability(Some("ext4"))),
            ..NodeStageVolumeRequest::default()
        })
        .await?;
    let took = started.elapsed();
    csi.node
        .clone()
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: name.to_owned(),
            staging_target_path: staging,
        })
        .await?;
    Ok(took)
}

async fn guest_side() -> anyhow::Result<()> {
    std::fs::create_dir_all("/run/lvmlocal")?;
    let (_agent, csi) = Agent::start(
        &workspace_binary("csi-agent"),
        Path::new("/run/lvmlocal/csi.sock"),
        "nvme",
    )
    .await?;

    let mut bare = Vec::new();
    let mut csi_create = Vec::new();
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always meets a warmer LVM.
        let (name_bare, name_csi) = (format!("bare-{round}"), format!("bench-{round}"));
        if round % 2 == 0 {
            bare.push(bare_lvcreate(&name_bare)?);
            csi_create.push(create(&csi, &name_csi, GIB).await?);
        } else {
            csi_create.push(create(&csi, &name_csi, GIB).await?);
            bare.push(bare_lvcreate(&name_bare)?);
        }
        lvm(&["lvremove", "--yes", &format!("{VG}/{name_bare}")])?;
        delete(&csi, &name_csi).await?;
    }
    let (bare_median, csi_median) = (median(&mut bare), median(&mut csi_create));
    println!("bare lvcreate 1 GiB, median of {ROUNDS}:        {bare_median:>10.1?}");
    println!(
        "CreateVolume 1 GiB to Ready, median of {ROUNDS}:  {csi_median:>10.1?}  ({:.2}x)",
        csi_median.as_secs_f64() / bare_median.as_secs_f64()
    );

    let mut serial = Duration::ZERO;
    for i in 0..CONCURRENT {
        serial += bare_lvcreate(&format!("serial-{i}"))?;
    }
    for i in 0..CONCURRENT {
        lvm(&["lvremove", "--yes", &format!("{VG}/serial-{i}")])?;
    }
    let started = Instant::now();
    let calls: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let csi = csi.clone();
            tokio::spawn(async move { create(&csi, &format!("many-{i}"), GIB).await })
        })
        .collect();
    for call in calls {
        call.await??;
    }
    let concurrent = started.elapsed();
    println!("{CONCURRENT} bare lvcreate, serial sum:            {serial:>10.1?}");
    println!(
        "{CONCURRENT} concurrent CreateVolume, all Ready:   {concurrent:>10.1?}  ({:.2}x)",
        concurrent.as_secs_f64() / serial.as_secs_f64()
    );
    for i in 0..CONCURRENT {
        delete(&csi, &format!("many-{i}")).await?;
    }

    // A new LV every round: staging formats a blank volume only once.
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for round in 0..STAGE_ROUNDS {
        for (samples, size) in [(&mut small, 10 * GIB), (&mut large, 1024 * GIB)] {
            let name = format!("stage-{}-{round}", size / GIB);
            create(&csi, &name, size).await?;
            samples.push(stage(&csi, &name).await?);
            // Kept, not deleted: DeleteVolume zeroes a volume whole (the
            // erase bench measures that), and the VM's sparse disks go
            // with the run.
        }
    }
    let (small, large) = (median(&mut small), median(&mut large));
    println!("NodeStageVolume ext4 10 GiB, median of {STAGE_ROUNDS}:   {small:>10.1?}");
    println!(
        "NodeStageVolume ext4 1 TiB, median of {STAGE_ROUNDS}:    {large:>10.1?}  ({:.2}x)",
        large.as_secs_f64() / small.as_secs_f64()
    );
    Ok(())
}
