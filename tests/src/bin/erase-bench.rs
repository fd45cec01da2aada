//! What erasing costs, per media class, in the VM: zeroing a whole LV
//! (`blkdiscard --zeroout`, as DeleteVolume does it) in seconds per GiB,
//! beside a bare `lvremove` of an LV of the same size, and DeleteVolume
//! (mark, zero, remove) end to end.
//!
//!     scripts/bench-erase.sh

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use lvmlocal_proto::csi::v1::DeleteVolumeRequest;
use lvmlocal_tests::csi::{Agent, create_request};
use lvmlocal_tests::guest::{self, workspace_binary};
use lvmlocal_tests::{GIB, Vm};

const ROUNDS: usize = 3;
const SIZE: u64 = 2 * GIB;

fn main() -> anyhow::Result<ExitCode> {
    if guest::inside() {
        tokio::runtime::Runtime::new()?.block_on(guest_side())?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()?;
    let output = Vm::new()
        .nvme("erase-nvme", 5, 16 * GIB)
        .ssd("erase-ssd", 0, 16 * GIB)
        .hdd("erase-hdd", 1, 16 * GIB)
        .memory_mib(2048)
        .timeout(Duration::from_secs(3600))
        .stream(true)
        .run(&[exe.to_str().context("exe path")?])?;
    Ok(ExitCode::from(u8::try_from(output.status).unwrap_or(1)))
}

fn run(args: &[&str]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(started.elapsed())
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn per_gib(took: Duration) -> f64 {
    took.as_secs_f64() / (SIZE as f64 / GIB as f64)
}

async fn guest_side() -> anyhow::Result<()> {
    std::fs::create_dir_all("/run/lvmlocal")?;
    let (_agent, csi) = Agent::start(
        &workspace_binary("csi-agent"),
        Path::new("/run/lvmlocal/csi.sock"),
        "hdd",
    )
    .await?;
    let size = format!("{SIZE}b");
    println!(
        "{} GiB LVs, median of {ROUNDS}:  zeroing (s/GiB)  bare lvremove  DeleteVolume",
        SIZE / GIB
    );
    for media in ["nvme", "ssd", "hdd"] {
        let vg = format!("lvmlocal-{media}");
        let (mut zero, mut remove, mut delete) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let bare = format!("bare-{round}");
            run(&[
                "lvcreate", "-n", &bare, "-L", &size, "-W", "n", "-Z", "n", &vg,
            ])?;
            zero.push(run(&[
                "blkdiscard",
                "--zeroout",
                &format!("/dev/{vg}/{bare}"),
            ])?);
            remove.push(run(&["lvremove", "--yes", &format!("{vg}/{bare}")])?);

            let name = format!("erase-{media}-{round}");
            csi.controller
                .clone()
                .create_volume(create_request(&name, media, None, SIZE))
                .await
                .with_context(|| format!("CreateVolume {name}"))?;
            let started = Instant::now();
            csi.controller
                .clone()
                .delete_volume(DeleteVolumeRequest {
                    volume_id: name.clone(),
                    ..DeleteVolumeRequest::default()
                })
                .await
                .with_context(|| format!("DeleteVolume {name}"))?;
            delete.push(started.elapsed());
        }
        let zero = median(&mut zero);
        println!(
            "{media:<4} {:>30.2} s/GiB ({zero:.1?}) {:>12.1?} {:>13.1?}",
            per_gib(zero),
            median(&mut remove),
            median(&mut delete),
        );
    }
    Ok(())
}
